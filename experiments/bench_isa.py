"""The C++ skinny kernel's AVX-512 paths against its AVX2 paths on one AVX-512 machine: SmolLM2 decode steps of
the packed backend per weight format, at batch 1 and batch 8, with the helper built three ways (the default build;
``-DDAERT_NO_AVX512=1``, the AVX2 paths; ``-DDAERT_FLOAT_BITS=512``, 512-bit float vectors) and the builds
interleaved in one process on the same packed weights. Prints a table, writes JSON.

    .venv/bin/python experiments/bench_isa.py --json experiments/results/bench_isa.json

What the AVX-512 build changes (``workbench/engine/csrc/packed_llama.cpp``): the q8 block dot products in one VNNI
``vpdpbusd`` instead of ``vpmaddubsw`` + ``vpmaddwd``; bfloat16 weights with ``bf16`` activations in AVX-512 BF16
``vdpbf16ps``. Float widening stays 8 floats a vector (16, zmm, with ``DAERT_FLOAT_BITS=512``). Each round: one
40-token prefill, then ``--steps`` timed single-token decode steps, on each build in turn; the step time is the
median over all rounds' steps, each speed-up over the AVX2 build the median of per-round ratios. Before timing, one
decode step's output is compared between the default and the AVX2 build (``max_abs_diff``; 0 where the two paths
are the same arithmetic).
"""

from __future__ import annotations

import statistics

from bench_pages import step_args, step_model, steps
from provenance import provenance, write_json

# weights+activations
FORMATS = {"fp32": ("fp32", "fp32"), "bf16": ("bf16", "fp32"), "bf16+bf16": ("bf16", "bf16"),
           "fp16": ("fp16", "fp32"), "int8": ("int8", "fp32"), "int8+q8": ("int8", "q8"), "q4": ("q4", "fp32"),
           "q4+q8": ("q4", "q8")}
BUILDS = {"avx2": {"DAERT_NO_AVX512": 1}, "avx512": None, "avx512-zmm": {"DAERT_FLOAT_BITS": 512}}
BATCHES = (1, 8)


def one_step_diff(backend, modules, tok_id: int) -> float:
    """Largest difference between the builds' logits after one prefill and one decode step."""
    import torch

    outs = []
    for module in modules.values():
        backend.native = module
        cache = backend.new_cache(1, 48)
        backend.forward(torch.full((1, 40), tok_id), torch.ones(1, 40, dtype=torch.long), torch.arange(40)[None],
                        cache)
        outs.append(backend.forward(torch.tensor([[tok_id]]), torch.ones(1, 41, dtype=torch.long),
                                    torch.tensor([[40]]), cache))
    return float((outs[0] - outs[1]).abs().max())


def main() -> None:
    args = step_args(__doc__, FORMATS)

    from workbench.engine import native
    from workbench.engine.backends import PackedLlamaBackend

    modules = {name: native.load("packed_llama", defines) for name, defines in BUILDS.items()}
    if None in modules.values():
        raise SystemExit("the C++ helper did not build (see the warning above)")
    isa = {name: dict(m.isa()) for name, m in modules.items()}
    if not isa["avx512"]["avx512"]:
        raise SystemExit(f"this CPU has no AVX-512 (the default build takes {isa['avx512']}): nothing to compare")
    model, tok_id = step_model(args)
    rows = {}
    for fmt in args.formats:
        weights, activations = FORMATS[fmt]
        backend = PackedLlamaBackend(model, weights=weights, activations=activations)
        row = {"weights": weights, "activations": activations,
               "max_abs_diff": one_step_diff(backend, {n: modules[n] for n in ("avx2", "avx512")}, tok_id)}
        for batch in BATCHES:
            times = {b: [] for b in modules}
            ratios = {name: [] for name in modules if name != "avx2"}
            for _ in range(args.rounds):
                per = {}
                for name, module in modules.items():
                    backend.native = module
                    per[name] = steps(backend, tok_id, args.steps, batch)
                    times[name] += per[name]
                for name in ratios:
                    ratios[name].append(statistics.median(per["avx2"]) / statistics.median(per[name]))
            print(f"{fmt} batch {batch}: {args.rounds} rounds", flush=True)
            ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
            row[f"batch{batch}"] = {"step_ms": {n: round(v, 2) for n, v in ms.items()},
                                    "tok_s": {n: round(batch * 1e3 / v, 1) for n, v in ms.items()},
                                    "speedup_vs_avx2": {n: round(statistics.median(v), 3) for n, v in ratios.items()}}
        rows[fmt] = row
        del backend
    names = list(modules)
    head = "".join(f"{f'b{b} ms {n}':>18s}" for b in BATCHES for n in names)
    head += "".join(f"{f'b{b} x {n}':>16s}" for b in BATCHES for n in names[1:])
    print(f"\n{'format':10s}{head}{'max |diff|':>12s}")
    for fmt, row in rows.items():
        cells = "".join(f"{row[f'batch{b}']['step_ms'][n]:18.2f}" for b in BATCHES for n in names)
        cells += "".join(f"{row[f'batch{b}']['speedup_vs_avx2'][n]:15.3f}x" for b in BATCHES for n in names[1:])
        print(f"{fmt:10s}{cells}{row['max_abs_diff']:12.2e}")
    write_json(args.json, {**provenance(), "model": args.model, "threads": args.threads, "rounds": args.rounds,
                           "steps": args.steps, "builds": {n: {"defines": BUILDS[n], "isa": isa[n]} for n in BUILDS},
                           "rows": rows})


if __name__ == "__main__":
    main()
