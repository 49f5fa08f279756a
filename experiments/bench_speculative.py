"""Prompt-lookup speculative decoding vs plain greedy decoding on SmolLM2, batch 1.

Two prompt families: input-grounded (rewrite / copy-edit / extract from a given passage: the output repeats the
input, so n-gram drafts are accepted) and open-ended (nothing to copy: drafts are rare and short). Runs are
interleaved (plain, speculative, plain, ...); outputs are checked token-for-token equal (both greedy).
Prints a table and writes JSON. Targets: >= 2x on grounded prompts, no more than 5% slower on open-ended.

    .venv/bin/python experiments/bench_speculative.py --new-tokens 64 --repeats 2 \
        --json experiments/results/bench_speculative.json   # the committed CPU results
    python experiments/bench_speculative.py --device cuda --new-tokens 64 --repeats 2 \
        --json experiments/results/bench_speculative_h100.json   # the committed H100 results
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from provenance import provenance, write_json  # experiments/ is the script's folder

PASSAGES = [
    "The Rhine rises in the Swiss Alps, forms part of the Swiss-Austrian and Swiss-German borders, then flows "
    "through the German Rhineland and the Netherlands and empties into the North Sea. It is one of the major "
    "rivers of Europe and has been a vital navigable waterway since Roman times.",
    "Photosynthesis is the process by which green plants use sunlight to turn water and carbon dioxide into "
    "glucose and oxygen. It takes place mainly in the leaves, inside small structures called chloroplasts, "
    "which contain the green pigment chlorophyll.",
    "The library opens at nine in the morning on weekdays and at ten on Saturdays. It is closed on Sundays and "
    "public holidays. Members may borrow up to six books at a time for three weeks, and renew them twice online.",
]
GROUNDED = [
    "Repeat the following text exactly, word for word:\n\n{p}",
    "Copy-edit the following text. Return the full corrected text and nothing else:\n\n{p}",
    "Rewrite the following text with every sentence on its own line:\n\n{p}",
]
OPEN = [
    "Write a short story about a dragon who learns to bake bread.",
    "Give me five ideas for a birthday party for a ten-year-old.",
    "Explain why the sky is blue to a curious child.",
]


def prompts(kind: str) -> list[str]:
    if kind == "grounded":
        return [t.format(p=p) for t in GROUNDED for p in PASSAGES][: 2 * len(PASSAGES)]
    return OPEN


def run(args) -> dict:
    import workbench
    from workbench.chat import prompt_ids
    from workbench.engine import Engine, GenerationConfig
    from workbench.engine.speculative import SpeculativeConfig
    from workbench.threads import ThreadPolicy

    model, tok = workbench.load(args.model, device=args.device, dtype=args.dtype, progress=False)
    eng = Engine(model, tok, threads=ThreadPolicy(args.threads, args.threads))
    plain_cfg = GenerationConfig(max_new_tokens=args.new_tokens)
    spec_cfg = SpeculativeConfig(max_new_tokens=args.new_tokens, proposer="prompt-lookup",
                                 num_draft=args.num_draft, max_draft=args.max_draft, ngram_min=args.ngram_min,
                                 ngram_max=max(args.ngram_min, 3))
    rows = []
    for kind in ("grounded", "open-ended"):
        t_plain = t_spec = 0.0
        n_plain = n_spec = proposed = accepted = steps = 0
        same = True
        for text in prompts(kind):
            ids = prompt_ids(tok, [{"role": "user", "content": text}])
            eng.generate([ids], GenerationConfig(max_new_tokens=4))  # warm-up
            tp, ts = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                [p] = eng.generate([ids], plain_cfg)
                t1 = time.perf_counter()
                [s] = eng.generate([ids], spec_cfg, strategy="speculative")
                t2 = time.perf_counter()
                tp.append(t1 - t0)
                ts.append(t2 - t1)
            same &= p.token_ids == s.token_ids
            t_plain += statistics.median(tp)
            t_spec += statistics.median(ts)
            n_plain += len(p.token_ids)
            n_spec += len(s.token_ids)
            proposed, accepted, steps = proposed + s.stats.proposed, accepted + s.stats.accepted, steps + s.stats.steps
        rows.append({"prompts": kind, "n_prompts": len(prompts(kind)), "plain_tok_s": n_plain / t_plain,
                     "spec_tok_s": n_spec / t_spec, "ratio": (n_spec / t_spec) / (n_plain / t_plain),
                     "acceptance_rate": accepted / max(1, proposed),
                     "mean_accepted_per_step": accepted / max(1, steps),
                     "tokens_per_target_forward": n_spec / max(1, steps + len(prompts(kind))),
                     "outputs_equal": same})
    where = torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else platform.processor()
    return {"model": args.model, "device": str(model.device), "device_name": where, "dtype": args.dtype,
            "threads": args.threads,
            "machine": platform.machine(), "torch": torch.__version__, "new_tokens": args.new_tokens,
            "num_draft": args.num_draft, "max_draft": args.max_draft, "ngram_min": args.ngram_min, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="float32 keeps greedy outputs comparable token for token")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--num-draft", type=int, default=4)
    ap.add_argument("--max-draft", type=int, default=12)
    ap.add_argument("--ngram-min", type=int, default=2, help="shortest n-gram prompt lookup may match")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    out = run(args)
    print(f"{'prompts':>11} {'plain tok/s':>12} {'spec tok/s':>11} {'ratio':>6} {'accept':>7} "
          f"{'acc/step':>9} {'tok/fwd':>8} {'equal':>6}")
    for r in out["rows"]:
        print(f"{r['prompts']:>11} {r['plain_tok_s']:>12.1f} {r['spec_tok_s']:>11.1f} {r['ratio']:>6.2f} "
              f"{r['acceptance_rate']:>7.2f} {r['mean_accepted_per_step']:>9.2f} "
              f"{r['tokens_per_target_forward']:>8.2f} {str(r['outputs_equal']):>6}")
    write_json(args.json, {**provenance(), **out})


if __name__ == "__main__":
    main()
