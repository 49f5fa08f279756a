"""Decode speed of this checkout against a base commit, measured side by side: batch 1, greedy, SmolLM2.

Each round runs the base and this checkout in turn, each in a fresh process (the base from a git worktree
made for the run), so drift on the machine affects both alike. Prints a table and writes JSON.

    .venv/bin/python experiments/bench_decode_paired.py --base bc7e16e --rounds 8 \
        --json experiments/results/bench_decode_paired.json   # the committed results
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from provenance import ROOT, provenance, write_json

# Run inside each side's process: load, warm up, time greedy batch-1 generations with the default backend.
PROBE = r"""
import json, sys, time, torch, workbench
from workbench.chat import prompt_ids
from workbench.engine import Engine, GenerationConfig
from workbench.threads import ThreadPolicy
model, tok = workbench.load(sys.argv[1], progress=False)
n, reps, threads = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
eng = Engine(model, tok, threads=ThreadPolicy(threads, threads))
ids = [prompt_ids(tok, [{"role": "user", "content": "Explain gravity to a child."}])]
cfg = GenerationConfig(max_new_tokens=n, ignore_eos=True)
out = eng.generate(ids, cfg)
times = []
for _ in range(reps):
    t0 = time.perf_counter()
    out = eng.generate(ids, cfg)
    times.append(time.perf_counter() - t0)
print(json.dumps({"tok_s": n / min(times), "tokens": out[0].token_ids, "backend": eng.backend.name,
                  "workbench": workbench.__file__}))
"""


def side(path: Path, args, ext_dir: Path | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(path)}
    if ext_dir is not None:  # the base's C++ helper builds apart, so the two sides never rebuild each other's
        env["TORCH_EXTENSIONS_DIR"] = str(ext_dir)
    out = subprocess.run([sys.executable, "-c", PROBE, args.model, str(args.new_tokens), str(args.repeats),
                          str(args.threads)], env=env, capture_output=True, text=True, check=True, cwd=path)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if not res["workbench"].startswith(str(path)):
        raise RuntimeError(f"imported {res['workbench']}, not the checkout at {path}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="git revision to compare against")
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="timed generations per process (the best counts)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base_dir), args.base],
                       check=True, capture_output=True)
        try:
            runs = {"base": [], "head": []}
            for _ in range(args.rounds):
                for name, path in (("base", base_dir), ("head", ROOT)):
                    runs[name].append(side(path, args, Path(tmp) / "ext" if name == "base" else None))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_dir)],
                           check=False, capture_output=True)
    med = {k: statistics.median(r["tok_s"] for r in v) for k, v in runs.items()}
    same = all(r["tokens"] == runs["base"][0]["tokens"] for v in runs.values() for r in v)
    out = {**provenance(), "model": args.model, "base": args.base, "batch": 1, "threads": args.threads,
           "new_tokens": args.new_tokens, "rounds": args.rounds, "repeats": args.repeats,
           "backend": {k: v[0]["backend"] for k, v in runs.items()},
           "tok_s": {k: [r["tok_s"] for r in v] for k, v in runs.items()}, "median_tok_s": med,
           "ratio_head_over_base": med["head"] / med["base"], "greedy_tokens_equal": same}
    print(f"{'side':>5} {'backend':>13} {'median tok/s':>13}  per round")
    for k in ("base", "head"):
        print(f"{k:>5} {out['backend'][k]:>13} {med[k]:>13.1f}  " + " ".join(f"{x:.1f}" for x in out["tok_s"][k]))
    print(f"head / base = {out['ratio_head_over_base']:.3f}; greedy tokens equal: {same}")
    write_json(args.json, out)


if __name__ == "__main__":
    main()
