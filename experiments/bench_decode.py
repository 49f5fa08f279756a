"""Decode throughput: the workbench engine vs HF ``generate`` on the same prompts and thread setting.

Runs are interleaved (engine, HF, engine, HF, ...) so drift affects both; prints a table and writes JSON.
Greedy, EOS ignored so every run produces exactly ``--new-tokens`` tokens per request.

    .venv/bin/python experiments/bench_decode.py --json experiments/results/bench_decode.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import workbench
from workbench.chat import prompt_ids
from workbench.engine import Engine, GenerationConfig
from workbench.threads import ThreadPolicy, num_threads

QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
    "Explain gravity to a child.", "Name a famous painter.", "What does a CPU do?",
    "Give me a synonym for happy.", "How many legs does a spider have?",
]


def run(args) -> dict:
    model, tok = workbench.load(args.model, device=args.device, progress=False)
    policy = ThreadPolicy(prefill=args.threads, decode=args.threads)
    engine = Engine(model, tok, threads=policy)
    cfg = GenerationConfig(max_new_tokens=args.new_tokens, ignore_eos=True)
    tok.padding_side = "left"
    rows = []
    for batch in args.batch:
        ids = [prompt_ids(tok, [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]) for i in range(batch)]
        enc = tok.pad({"input_ids": ids}, return_tensors="pt").to(model.device)
        times = {"engine": [], "hf": []}
        for rep in range(args.repeats + 1):  # first round is warm-up
            t0 = time.perf_counter()
            engine.generate(ids, cfg)
            t1 = time.perf_counter()
            with num_threads(args.threads), torch.inference_mode():
                model.generate(**enc, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                               do_sample=False, pad_token_id=tok.pad_token_id)
            t2 = time.perf_counter()
            if rep:
                times["engine"].append(t1 - t0)
                times["hf"].append(t2 - t1)
        toks = batch * args.new_tokens
        eng, hf = statistics.median(times["engine"]), statistics.median(times["hf"])
        rows.append({"batch": batch, "new_tokens": args.new_tokens, "engine_tok_s": toks / eng,
                     "hf_tok_s": toks / hf, "ratio": hf / eng, "repeats": args.repeats})
    return {"model": args.model, "device": str(model.device), "threads": args.threads,
            "machine": f"{platform.machine()} {torch.get_num_threads()} torch threads max",
            "torch": torch.__version__, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    out = run(args)
    print(f"{'batch':>5} {'engine tok/s':>13} {'HF tok/s':>9} {'ratio':>6}")
    for r in out["rows"]:
        print(f"{r['batch']:>5} {r['engine_tok_s']:>13.1f} {r['hf_tok_s']:>9.1f} {r['ratio']:>6.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
