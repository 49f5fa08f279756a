"""Multi-LoRA decode throughput on SmolLM2: batch 8, base model vs one adapter for every row vs 8 different
adapters, rank 8 and 16 on every linear layer; interleaved rounds in one process. Prints a table, writes JSON.

    .venv/bin/python experiments/bench_lora.py --json experiments/results/bench_lora.json

Target on CPU: 8 different adapters >= 0.8x the base model's throughput. The adapters are PEFT LoRA folders with
random non-zero weights (B scaled so that the text stays fluent-ish); the registry holds them in its pools and
every row adds its own adapter's terms (never merged). On a CUDA machine (``--device cuda``) the same script runs
the HF backend, where the terms come from the Triton BGMV kernels or from a torch loop over the batch's adapters;
both are timed (the ``[triton]`` and ``[torch]`` rows).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

from provenance import provenance, write_json

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUESTIONS = ["Explain gravity to a child.", "Write a haiku about rain.", "What is a prime number?",
             "Give me three tips for sleeping well.", "Describe the colour blue.", "Why is the sea salty?",
             "How do plants make food?", "Tell me a fun fact about owls."]


def make_adapters(model, root: Path, rank: int, count: int, b_scale: float) -> list[Path]:
    import peft
    import torch

    paths = []
    for i in range(count):
        torch.manual_seed(1000 * rank + i)
        cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)
        pm = peft.get_peft_model(copy.deepcopy(model), cfg)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.mul_(b_scale)
        path = root / f"r{rank}_{i}"
        pm.save_pretrained(path)
        paths.append(path)
        del pm
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--b-scale", type=float, default=0.05, help="factor on the random B matrices")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import workbench
    from workbench.chat import prompt_ids
    from workbench.engine import Engine, GenerationConfig
    from workbench.engine.config import GREEDY
    from workbench.lora import AdapterRegistry
    from workbench.threads import ThreadPolicy

    model, tok = workbench.load(args.model, device=args.device, progress=False)
    prompts = [prompt_ids(tok, [{"role": "user", "content": q}]) for q in (QUESTIONS * 4)[: args.batch]]
    cfg = GenerationConfig(max_new_tokens=args.new_tokens, sampling=GREEDY, ignore_eos=True)
    reg = AdapterRegistry(model, max_resident=len(args.ranks) * args.batch)
    configs: dict[str, list | None] = {"base": None}
    tmp = tempfile.TemporaryDirectory()  # the folders live as long as the run
    for r in args.ranks:
        for i, p in enumerate(make_adapters(model, Path(tmp.name), r, args.batch, args.b_scale)):
            reg.add(f"r{r}_{i}", p)
        configs[f"r{r} one adapter"] = [f"r{r}_0"] * args.batch
        configs[f"r{r} {args.batch} adapters"] = [f"r{r}_{i}" for i in range(args.batch)]
    eng = Engine(model, tok, adapters=reg, threads=ThreadPolicy(args.threads, args.threads))
    impls = ["triton", "torch"] if args.device.startswith("cuda") else [None]

    def run(names, impl):
        if impl is not None:
            reg.kernel = impl
        with eng.intervene(adapters=names):
            t0 = time.perf_counter()
            out = eng.generate(prompts, cfg)
            return time.perf_counter() - t0, [r.token_ids for r in out], eng.backend.name

    cells = [(name, impl) for name in configs for impl in (impls if configs[name] else [None])]
    for name, impl in cells:  # warm up every cell (C++ build, pools, caches)
        run(configs[name], impl)
    times: dict[str, list[float]] = {}
    tokens, backends = {}, {}
    for k in range(args.rounds):
        order = cells[k % len(cells):] + cells[: k % len(cells)]  # rotate: drift hits every cell alike
        for name, impl in order:
            label = name if impl is None else f"{name} [{impl}]"
            dt, toks, backend = run(configs[name], impl)
            times.setdefault(label, []).append(dt)
            tokens[label], backends[label] = toks, backend
            print(f"round {k + 1}/{args.rounds} {label:28} {args.batch * args.new_tokens / dt:7.1f} tok/s", flush=True)

    n_tok = args.batch * args.new_tokens
    base_rounds = times["base"]
    rows = []
    for label, ts in times.items():
        ratios = [b / t for b, t in zip(base_rounds, ts, strict=True)]  # per round: tok/s over the base's
        rows.append({"config": label, "tok_s": round(n_tok / statistics.median(ts), 2),
                     "tok_s_rounds": [round(n_tok / t, 2) for t in ts],
                     "ratio_to_base": round(statistics.median(ratios), 3), "backend": backends[label],
                     "rows_differing_from_base": sum(a != b for a, b in zip(tokens[label], tokens["base"], strict=True))})
    print(f"\n{'config':30} {'tok/s':>8} {'x base':>7} {'rows != base':>13}")
    for r in rows:
        print(f"{r['config']:30} {r['tok_s']:8.1f} {r['ratio_to_base']:7.3f} {r['rows_differing_from_base']:13d}")
    eight = [r for r in rows if f"{args.batch} adapters" in r["config"]]
    target = {"rule": f"{args.batch} different adapters >= 0.8x base throughput",
              "met": {r["config"]: r["ratio_to_base"] >= 0.8 for r in eight}}
    print("target:", target)
    if args.json:
        write_json(args.json, {**provenance(), "model": args.model, "batch": args.batch,
                               "new_tokens": args.new_tokens, "rounds": args.rounds, "threads": args.threads,
                               "device": args.device, "ranks": args.ranks, "targets": TARGETS,
                               "b_scale": args.b_scale, "results": rows, "target": target})


if __name__ == "__main__":
    main()
