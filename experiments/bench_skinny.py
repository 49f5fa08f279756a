"""The packed backend's skinny matmul (C++, ``workbench/engine/csrc/packed_llama.cpp``) vs BLAS on SmolLM2's
weights: one forward's weight matmuls (30 layers' q/k/v, o, gate/up, down and the LM head, 540 MB of fp32,
read from memory, not cache) for M = 1 ... 16 rows, the row counts of decode steps and speculative verification.

BLAS runs ``torch.mm`` on ``[d_in, d_out]`` copies (its fastest layout here) into preallocated outputs; the
kernel reads the packed ``[d_out, d_in]`` weights. Prints a table and writes JSON.

    .venv/bin/python experiments/bench_skinny.py --json experiments/results/bench_skinny.json   # committed results
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from provenance import provenance, write_json  # experiments/ is the script's folder


def time_ms(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in ms over ``repeats`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def weight_matmuls(backend, m: int) -> dict:
    """One forward's weight matmuls for ``m`` rows, each way available: ``blas`` (``torch.mm`` on
    ``[d_in, d_out]`` copies into preallocated outputs) and ``skinny`` (the native kernel on the packed
    ``[d_out, d_in]`` weights, when built and ``m`` is within its row limit). Values: zero-argument callables."""
    packed = [w for ly in backend.layers for w in (ly.wqkv, ly.wo, ly.wgu, ly.wdown)] + [backend.lm_head]
    xs = {w.shape[1]: torch.randn(m, w.shape[1]) for w in packed}
    blas = [w.t().contiguous() for w in packed]
    outs = [torch.empty(m, w.shape[1]) for w in blas]

    def run_blas():
        for w, o in zip(blas, outs, strict=True):
            torch.mm(xs[w.shape[0]], w, out=o)

    ways = {"blas": run_blas}
    if backend.native is not None and m <= backend.SKINNY_MAX_ROWS:
        head = packed[-1]  # the kernel's result is checked on the LM head before it is timed
        x = xs[head.shape[1]]
        torch.testing.assert_close(backend.native.skinny_linear(x, head), x @ head.T, rtol=1e-4, atol=1e-3)

        def run_skinny():
            for w in packed:
                backend.native.skinny_linear(xs[w.shape[1]], w)

        ways["skinny"] = run_skinny
    return ways


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8, 12, 16])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import workbench
    from workbench.cpu import cpu_name
    from workbench.engine.backends import PackedLlamaBackend

    model, _ = workbench.load(args.model, device="cpu", progress=False)
    backend = PackedLlamaBackend(model, native=True)
    rows = []
    print(f"{'threads':>7} {'rows':>4} {'BLAS ms':>8} {'skinny ms':>9} {'speed-up':>8}")
    with torch.inference_mode():
        for threads in args.threads:
            torch.set_num_threads(threads)
            for m in args.rows:
                ways = weight_matmuls(backend, m)
                t_blas, t_sk = time_ms(ways["blas"], args.repeats), time_ms(ways["skinny"], args.repeats)
                rows.append({"threads": threads, "rows": m, "blas_ms": t_blas, "skinny_ms": t_sk,
                             "speedup": t_blas / t_sk})
                print(f"{threads:>7} {m:>4} {t_blas:>8.1f} {t_sk:>9.1f} {t_blas / t_sk:>8.2f}", flush=True)
    if args.json:
        write_json(args.json, {**provenance(), "model": args.model, "cpu": cpu_name(), "torch": torch.__version__,
                               "rows": rows})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
