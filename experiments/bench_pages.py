"""Weight copies on 2 MiB pages against 4 KiB pages: SmolLM2 decode steps of the packed backend at batch 1, per
weight format, the two placements of the same weights interleaved in one process. Prints a table, writes JSON.

    .venv/bin/python experiments/bench_pages.py --json experiments/results/bench_pages.json

Each round: one 40-token prefill, then ``--steps`` timed single-token decode steps, on each placement in turn;
the step time is the median over all rounds' steps, and the ratio the median of per-round ratios. The 4 KiB
placement is the backend built with ``DAERT_NO_HUGEPAGES=1`` (see :mod:`workbench.engine.hugepages`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from provenance import provenance, write_json

FORMATS = {"fp32": "fp32", "fp16": "fp32", "int8+q8": "q8", "q4+q8": "q8"}  # weights+activations: activations


def steps(backend, tok_id: int, n: int, batch: int = 1) -> list[float]:
    """Wall times of ``n`` single-token decode steps of ``batch`` rows after a 40-token prefill."""
    import torch

    cache = backend.new_cache(batch, 40 + n)
    backend.forward(torch.full((batch, 40), tok_id), torch.ones(batch, 40, dtype=torch.long),
                    torch.arange(40).expand(batch, 40), cache)
    out = []
    for _ in range(n):
        length = cache.length
        t = time.perf_counter()
        backend.forward(torch.full((batch, 1), tok_id), torch.ones(batch, length + 1, dtype=torch.long),
                        torch.full((batch, 1), length), cache)
        out.append(time.perf_counter() - t)
    return out


def step_args(doc: str, formats) -> argparse.Namespace:
    """The command line of the decode-step benchmarks (this one and ``bench_prefetch.py``)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("--formats", nargs="+", default=list(formats), choices=list(formats))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--json", type=Path)
    return ap.parse_args()


def step_model(args):
    """The model at ``args.threads`` threads, and the token id every step feeds."""
    import torch

    from workbench import load

    torch.set_num_threads(args.threads)
    model, tok = load(args.model)
    return model, tok.encode("Hello")[0]


def main() -> None:
    args = step_args(__doc__, FORMATS)

    from workbench.engine import hugepages
    from workbench.engine.backends import PackedLlamaBackend

    if not hugepages.available():
        raise SystemExit("huge pages are unavailable here (no MADV_HUGEPAGE, or DAERT_NO_HUGEPAGES is set)")
    model, tok_id = step_model(args)
    rows = {}
    for fmt in args.formats:
        weights, _, _ = fmt.partition("+")
        built = {}
        for pages, off in (("4k", "1"), ("2m", "0")):
            os.environ["DAERT_NO_HUGEPAGES"] = off
            built[pages] = PackedLlamaBackend(model, weights=weights, activations=FORMATS[fmt])
        os.environ.pop("DAERT_NO_HUGEPAGES")
        times = {p: [] for p in built}
        ratios = []
        for r in range(args.rounds):
            per = {p: steps(b, tok_id, args.steps) for p, b in built.items()}
            for p, t in per.items():
                times[p] += t
            ratios.append(statistics.median(per["4k"]) / statistics.median(per["2m"]))
            print(f"{fmt} round {r + 1}/{args.rounds}", flush=True)
        rows[fmt] = {"step_ms_4k": round(statistics.median(times["4k"]) * 1e3, 2),
                     "step_ms_2m": round(statistics.median(times["2m"]) * 1e3, 2),
                     "speedup": round(statistics.median(ratios), 3),
                     "advised": built["2m"].huge_pages}
        del built
    print(f"\n{'format':10s} {'4 KiB ms':>9s} {'2 MiB ms':>9s} {'speedup':>8s}")
    for fmt, row in rows.items():
        print(f"{fmt:10s} {row['step_ms_4k']:9.2f} {row['step_ms_2m']:9.2f} {row['speedup']:8.3f}")
    write_json(args.json, {**provenance(), "model": args.model, "threads": args.threads, "rounds": args.rounds,
                           "steps": args.steps, "rows": rows})


if __name__ == "__main__":
    main()
