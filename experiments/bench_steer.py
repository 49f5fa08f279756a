"""Steered vs unsteered decode speed on the default CPU backend, SmolLM2, batch 1, greedy: paired rounds in one
process. Prints a table, writes JSON.

    .venv/bin/python experiments/bench_steer.py --json experiments/results/bench_steer.json

A control vector is a residual offset at every layer's ``hook_resid_post`` (layers 1..L-1, as repeng trains
them). Target: steered >= 0.95x unsteered tok/s. The vector here is random with the norms of a trained one
(speed does not depend on the direction); the same run also times one vector per request in a batch of 4.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from provenance import provenance, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--strength", type=float, default=2.0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    import workbench
    from workbench.chat import prompt_ids
    from workbench.engine import Engine, GenerationConfig
    from workbench.engine.config import GREEDY
    from workbench.surgery import ControlVector
    from workbench.surgery.steer import steer
    from workbench.threads import ThreadPolicy

    model, tok = workbench.load(args.model, progress=False)
    eng = Engine(model, tok, threads=ThreadPolicy(args.threads, args.threads))
    n_layers, d = model.config.num_hidden_layers, model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    vector = ControlVector(model_type=model.config.model_type,
                           directions={i: torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
                                       for i in range(1, n_layers)})
    ids = [prompt_ids(tok, [{"role": "user", "content": "Explain gravity to a child."}])]
    batch = [prompt_ids(tok, [{"role": "user", "content": q}]) for q in
             ("Explain gravity to a child.", "Write a haiku about rain.", "What is a prime number?",
              "Describe the colour blue.")]
    cfg = GenerationConfig(max_new_tokens=args.new_tokens, sampling=GREEDY, ignore_eos=True)

    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out

    def plain():
        return eng.generate(ids, cfg)

    def steered():
        with steer(eng, vector, args.strength):
            return eng.generate(ids, cfg)

    def plain_batch():
        return eng.generate(batch, cfg)

    def steered_batch():  # one vector per request, two of them unsteered
        with steer(eng, [(vector, args.strength), None, (vector, -args.strength), None]):
            return eng.generate(batch, cfg)

    cells = {"batch 1 unsteered": (plain, 1), "batch 1 steered": (steered, 1),
             "batch 4 unsteered": (plain_batch, 4), "batch 4, per-request vectors": (steered_batch, 4)}
    for fn, _ in cells.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in cells}
    outs = {}
    for r in range(args.rounds):
        names = list(cells) if r % 2 == 0 else list(reversed(cells))
        for name in names:
            dt, out = timed(cells[name][0])
            times[name].append(dt)
            outs[name] = [o.token_ids for o in out]
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{k} {cells[k][1] * args.new_tokens / times[k][-1]:.1f}" for k in cells), flush=True)
    tok_s = {k: cells[k][1] * args.new_tokens / statistics.median(v) for k, v in times.items()}
    ratio1 = statistics.median(a / b for a, b in zip(times["batch 1 unsteered"], times["batch 1 steered"], strict=True))
    ratio4 = statistics.median(a / b for a, b in zip(times["batch 4 unsteered"], times["batch 4, per-request vectors"],
                                                     strict=True))
    print(f"\n{'config':32} {'tok/s':>8}")
    for k, v in tok_s.items():
        print(f"{k:32} {v:8.1f}")
    print(f"steered / unsteered, batch 1: {ratio1:.3f} (target >= 0.95: {'met' if ratio1 >= 0.95 else 'MISSED'})")
    print(f"per-request vectors / unsteered, batch 4: {ratio4:.3f}")
    changed = outs["batch 1 steered"] != outs["batch 1 unsteered"]
    if args.json:
        write_json(args.json, {**provenance(), "model": args.model, "new_tokens": args.new_tokens,
                               "rounds": args.rounds, "threads": args.threads, "strength": args.strength,
                               "backend": eng.backend.name, "tok_s": {k: round(v, 2) for k, v in tok_s.items()},
                               "tok_s_rounds": {k: [round(cells[k][1] * args.new_tokens / t, 2) for t in v]
                                                for k, v in times.items()},
                               "ratio_batch1": round(ratio1, 4), "ratio_batch4_per_request": round(ratio4, 4),
                               "steering_changed_the_output": changed,
                               "target": {"rule": "steered >= 0.95x unsteered, batch 1", "met": ratio1 >= 0.95}})


if __name__ == "__main__":
    main()
