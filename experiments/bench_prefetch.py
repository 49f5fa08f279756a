"""Software prefetch distances of the C++ skinny kernel: SmolLM2 decode steps of the packed backend at batch 1,
per weight format, with the helper built at 0 (none), 1 KiB and 4 KiB ahead, interleaved in one process on the
same packed weights. Prints a table, writes JSON.

    .venv/bin/python experiments/bench_prefetch.py --json experiments/results/bench_prefetch.json

The helper (``workbench/engine/csrc/packed_llama.cpp``) takes its distances from ``DAERT_PF_F32`` (float32),
``DAERT_PF_16`` (bfloat16, float16) and ``DAERT_PF_8`` (int8, 4-bit, q8 activations); each variant here changes the
one its format reads. Each round: one 40-token prefill, then ``--steps`` timed single-token decode steps on each
variant in turn; the step time is the median over all rounds' steps.
"""

from __future__ import annotations

import statistics

from bench_pages import step_args, step_model, steps
from provenance import provenance, write_json

FORMATS = {"fp32": ("fp32", "DAERT_PF_F32"), "fp16": ("fp32", "DAERT_PF_16"), "int8+q8": ("q8", "DAERT_PF_8"),
           "q4+q8": ("q8", "DAERT_PF_8")}  # weights+activations: activations, the distance it reads
DISTANCES = (0, 1024, 4096)


def main() -> None:
    args = step_args(__doc__, FORMATS)

    from workbench.engine import native
    from workbench.engine.backends import PackedLlamaBackend

    model, tok_id = step_model(args)
    rows = {}
    for fmt in args.formats:
        weights, _, _ = fmt.partition("+")
        activations, macro = FORMATS[fmt]
        backend = PackedLlamaBackend(model, weights=weights, activations=activations)
        if backend.native is None:
            raise SystemExit("the C++ helper is unavailable here")
        modules = {d: native.load("packed_llama", {macro: d}) for d in DISTANCES}
        if None in modules.values():
            raise SystemExit(f"the C++ helper did not build with one of the {macro} values (see the warning above)")
        times = {d: [] for d in DISTANCES}
        for r in range(args.rounds):
            for d, module in modules.items():
                backend.native = module
                times[d] += steps(backend, tok_id, args.steps)
            print(f"{fmt} round {r + 1}/{args.rounds}", flush=True)
        ms = {d: statistics.median(t) * 1e3 for d, t in times.items()}
        rows[fmt] = {"macro": macro, "step_ms": {str(d): round(v, 2) for d, v in ms.items()},
                     "fastest": min(ms, key=ms.get)}
    print(f"\n{'format':10s} {'macro':14s}" + "".join(f"{d:>9d}" for d in DISTANCES) + "  fastest")
    for fmt, row in rows.items():
        print(f"{fmt:10s} {row['macro']:14s}" + "".join(f"{row['step_ms'][str(d)]:9.2f}" for d in DISTANCES)
              + f"  {row['fastest']}")
    write_json(args.json, {**provenance(), "model": args.model, "threads": args.threads, "rounds": args.rounds,
                           "steps": args.steps, "distances_bytes": list(DISTANCES), "rows": rows})


if __name__ == "__main__":
    main()
