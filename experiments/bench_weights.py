"""The packed backend's weight formats on SmolLM2: decode speed (batch 1 and 8, interleaved rounds in one
process) and quality against fp32 (top-1 agreement along fp32's greedy continuations, GPL-3 perplexity through
the engine). Prints a table, writes JSON.

    .venv/bin/python experiments/bench_weights.py --json experiments/results/bench_weights.json

Formats: ``fp32``, ``bf16``, ``fp16``, ``int8``, ``q4`` (quantized from the fp32 weights) and ``q4-gguf`` (``q4``
with the model's GGUF Q4_1 blocks taken as they are); ``+q8`` after int8 / q4 names: with ``activations="q8"``
(integer dot products on int8-quantized matmul inputs). Perplexity is measured twice: teacher-forced (a prefill,
ATen on the dequantized weights) and token by token through decode steps (the C++ skinny kernel, where the
formats and activations act); the targets are checked on the decode-step value: within 1% of fp32 for the
16-bit and 8-bit formats, within 5% for 4-bit. Exactness (greedy == HF) is a claim for fp32 only.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

from provenance import provenance, write_json

QUESTIONS = ["Explain gravity to a child.", "Write a haiku about rain.", "What is a prime number?",
             "Give me three tips for sleeping well.", "Describe the colour blue.", "Why is the sea salty?",
             "How do plants make food?", "Tell me a fun fact about owls.", "What causes the seasons?",
             "How does a bicycle stay upright?", "Name three uses of copper.", "What is a black hole?",
             "Summarise the water cycle.", "Why do cats purr?", "What is inflation?", "How do vaccines work?"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("--formats", nargs="+", default=["fp32", "bf16", "fp16", "int8", "int8+q8", "q4", "q4+q8",
                                                     "q4-gguf", "q4-gguf+q8"])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--agree-tokens", type=int, default=48)
    ap.add_argument("--windows", type=int, default=8, help="GPL-3 windows of --window tokens")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    import workbench
    from workbench.chat import prompt_ids
    from workbench.data.windows import token_windows
    from workbench.engine import Engine, GenerationConfig
    from workbench.engine.config import GREEDY
    from workbench.threads import ThreadPolicy

    model, tok = workbench.load(args.model, progress=False)
    threads = ThreadPolicy(args.threads, args.threads)
    def engine(name):
        f, _, act = name.partition("+")
        act = act or "fp32"
        if f != "q4-gguf":
            return Engine(model, tok, weights=f, activations=act, threads=threads)
        from workbench.models.cache import source_gguf
        from workbench.models.registry import get_spec

        eng = Engine(model, tok, weights="q4", gguf=source_gguf(get_spec(args.model), progress=False),
                     activations=act, threads=threads)
        print(f"{name}: matrices {eng.backend.weights_from}", flush=True)
        return eng

    engines = {f: engine(f) for f in args.formats}
    prompts = [prompt_ids(tok, [{"role": "user", "content": q}]) for q in QUESTIONS]
    cfg = GenerationConfig(max_new_tokens=args.new_tokens, sampling=GREEDY, ignore_eos=True)

    # -- quality ---------------------------------------------------------------------------------------
    ref_cfg = GenerationConfig(max_new_tokens=args.agree_tokens, sampling=GREEDY, ignore_eos=True)
    reference = [r.token_ids for r in engines["fp32"].generate(prompts, ref_cfg)]
    windows = token_windows(tok, "gpl-3", args.window, max_windows=args.windows)

    def decode_nll(eng, ids):
        """Negative log-likelihood of ids[1:], one decode step per token (the skinny kernel's path)."""
        s = eng.start([ids[:1]], len(ids))
        logits, total = s.logits, 0.0
        for i in range(1, len(ids)):
            total -= torch.log_softmax(logits[0].float(), -1)[ids[i]].item()
            if i < len(ids) - 1:
                logits = s.decode(torch.tensor([ids[i]]))
        return total

    quality = {}
    for f, eng in engines.items():
        agree = total = same_text = 0
        for p, ref in zip(prompts, reference, strict=True):
            lg = eng.teacher_forced(p, ref)
            agree += int((lg.argmax(-1) == torch.tensor(ref)).sum())
            total += len(ref)
        for ref, out in zip(reference, eng.generate(prompts, ref_cfg), strict=True):
            same_text += out.token_ids == ref
        nll = n = 0.0
        for w in windows:
            ids = [int(t) for t in w]
            lp = torch.log_softmax(eng.teacher_forced(ids[:1], ids[1:]).float(), -1)
            nll += -lp.gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
            n += len(ids) - 1
        nll_dec = sum(decode_nll(eng, [int(t) for t in w]) for w in windows)
        quality[f] = {"top1_agreement": round(agree / total, 4), "greedy_identical": f"{same_text}/{len(prompts)}",
                      "ppl": round(math.exp(nll / n), 4), "ppl_decode": round(math.exp(nll_dec / n), 4)}
        print(f"{f}: top-1 agreement {agree / total:.4f}, identical greedy {same_text}/{len(prompts)}, "
              f"GPL-3 perplexity {math.exp(nll / n):.4f} (prefill), {math.exp(nll_dec / n):.4f} (decode steps)",
              flush=True)

    # -- speed -----------------------------------------------------------------------------------------
    cells = [(f, b) for b in (1, 8) for f in args.formats]
    for f, b in cells:
        engines[f].generate(prompts[:b], cfg)  # warm-up
    times: dict[tuple, list[float]] = {c: [] for c in cells}
    for r in range(args.rounds):
        order = cells[r % len(cells):] + cells[: r % len(cells)]
        for f, b in order:
            t0 = time.perf_counter()
            engines[f].generate(prompts[:b], cfg)
            times[(f, b)].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{f}@{b} {b * args.new_tokens / times[(f, b)][-1]:.1f}" for f, b in cells), flush=True)
    speed = {}
    for f, b in cells:
        base = times[("fp32", b)]
        speed[f"{f} batch {b}"] = {
            "tok_s": round(b * args.new_tokens / statistics.median(times[(f, b)]), 2),
            "ratio_to_fp32": round(statistics.median(t0 / t for t0, t in zip(base, times[(f, b)], strict=True)), 3)}

    print(f"\n{'format':11} {'top-1':>7} {'greedy':>6} {'ppl':>9} {'ppl dec':>9} {'vs fp32':>8} {'tok/s b1':>9} "
          f"{'x fp32':>7} {'tok/s b8':>9} {'x fp32':>7}")
    p32, d32 = quality["fp32"]["ppl"], quality["fp32"]["ppl_decode"]
    for f in args.formats:
        q, s1, s8 = quality[f], speed[f"{f} batch 1"], speed[f"{f} batch 8"]
        q["ppl_change"] = round(q["ppl"] / p32 - 1, 5)
        q["ppl_decode_change"] = round(q["ppl_decode"] / d32 - 1, 5)
        print(f"{f:11} {q['top1_agreement']:7.4f} {q['greedy_identical']:>6} {q['ppl']:9.4f} {q['ppl_decode']:9.4f} "
              f"{100 * q['ppl_decode_change']:+7.2f}% {s1['tok_s']:9.1f} {s1['ratio_to_fp32']:7.3f} "
              f"{s8['tok_s']:9.1f} {s8['ratio_to_fp32']:7.3f}")
    bits = {"bf16": 0.01, "fp16": 0.01, "int8": 0.01, "q4": 0.05, "q4-gguf": 0.05}
    limit = {f: bits[f.partition("+")[0]] for f in args.formats if f.partition("+")[0] in bits}
    targets = {f: abs(quality[f]["ppl_decode_change"]) <= limit[f] for f in limit}
    print("decode-step perplexity within 1% (16/8-bit) or 5% (4-bit) of fp32:", targets)
    if args.json:
        write_json(args.json, {**provenance(), "model": args.model, "threads": args.threads,
                               "new_tokens": args.new_tokens, "rounds": args.rounds,
                               "agreement": {"prompts": len(prompts), "tokens_each": args.agree_tokens},
                               "ppl_text": f"GPL-3, {len(windows)} windows of {args.window} tokens",
                               "quality": quality, "speed": speed, "ppl_targets": {"limits": limit, "met": targets},
                               "weights_from": {f: engines[f].backend.weights_from for f in args.formats}})


if __name__ == "__main__":
    main()
