"""Build, check and time every Triton kernel against its torch reference; prints a table, writes JSON.

On a CUDA GPU (the real benchmark; targets on H100: sampler >= 2x torch's sort-based top-p at vocab 49152 for
batch 1..256, RoPE and SAE decode near memory bandwidth; multi-LoRA BGMV shrink + expand at SmolLM2 shapes against
a torch loop over the batch's adapters):

    .venv/bin/python experiments/bench_kernels.py --json experiments/results/bench_kernels_<gpu>.json

Without a GPU, ``--smoke`` runs the same code on tiny shapes in Triton's CPU interpreter (timings meaningless;
used by the test-suite to keep the script working).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from provenance import provenance, write_json  # experiments/ is the script's folder


def timer(smoke: bool):
    if smoke:
        def bench(fn):
            fn()
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return 1000 * statistics.median(times)
        return bench
    from triton.testing import do_bench

    return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")  # ms


def torch_top_p(logits, top_p: float, temperature: float):
    """The usual torch baseline: sort, softmax, cumsum, mask, multinomial."""
    import torch

    srt, idx = torch.sort(logits / temperature, descending=True)
    probs = srt.softmax(-1)
    drop = probs.cumsum(-1) - probs >= top_p
    probs = probs.masked_fill(drop, 0.0)
    return idx.gather(1, torch.multinomial(probs, 1)).squeeze(1)


def bench_sampler(dev, bench, smoke):
    import torch

    from workbench.kernels import sampling

    V = 97 if smoke else 49152
    rows = []
    for B in ([1, 3] if smoke else [1, 4, 16, 64, 256]):
        logits = torch.randn(B, V, device=dev) * 3
        draws = sampling.sample(logits, temperature=1.0, top_p=0.9, seeds=torch.arange(B, device=dev), impl="triton")
        kept = sampling.filtered_probs(logits, 1.0, top_p=0.9) > 0
        assert bool(kept.gather(1, draws[:, None]).all()), "sampler drew outside the nucleus"
        t_kernel = bench(lambda: sampling.sample(logits, temperature=1.0, top_p=0.9, seeds=7, impl="triton"))  # noqa: B023
        t_torch = bench(lambda: torch_top_p(logits, 0.9, 1.0))  # noqa: B023
        rows.append({"kernel": "sampling top-p 0.9", "shape": f"B={B} V={V}", "triton_ms": t_kernel,
                     "torch_ms": t_torch, "speedup": t_torch / t_kernel})
    return rows


def bench_verify(dev, bench, smoke):
    import torch

    from workbench.kernels import spec_verify

    V, K = (53, 3) if smoke else (49152, 4)
    rows = []
    for B in ([2] if smoke else [1, 16, 64]):
        p = torch.softmax(torch.randn(B, K + 1, V, device=dev), -1)
        q = torch.softmax(torch.randn(B, K, V, device=dev), -1)
        d = torch.multinomial(q.view(-1, V), 1).view(B, K)
        ua, us = torch.rand(B, K, device=dev), torch.rand(B, device=dev)
        got = spec_verify.verify(d, q, p, ua, us, impl="triton")
        ref = spec_verify.verify_reference(d, q, p, ua, us)
        assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True)), "verify differs from reference"
        t_kernel = bench(lambda: spec_verify.verify(d, q, p, ua, us, impl="triton"))  # noqa: B023
        t_torch = bench(lambda: spec_verify.verify_reference(d, q, p, ua, us))  # noqa: B023
        rows.append({"kernel": "spec verify", "shape": f"B={B} K={K} V={V}", "triton_ms": t_kernel,
                     "torch_ms": t_torch, "speedup": t_torch / t_kernel})
    return rows


def bench_rope(dev, bench, smoke):
    import torch

    from workbench.kernels import rope

    B, H, KV, T, D = (1, 2, 1, 3, 8) if smoke else (8, 32, 8, 2048, 128)
    dtype = torch.float32 if smoke else torch.bfloat16
    q = torch.randn(B, H, T, D, device=dev, dtype=dtype)
    k = torch.randn(B, KV, T, D, device=dev, dtype=dtype)
    pos = torch.arange(T, device=dev).expand(B, T).contiguous()
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=dev).float() / D)) / 8.0  # linear scaling x8
    got = rope.apply_rope(q, k, pos, inv, 1.1, impl="triton")
    ref = rope.rope_reference(q, k, pos, inv, 1.1)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=0.1, rtol=0.02)
    t_kernel = bench(lambda: rope.apply_rope(q, k, pos, inv, 1.1, impl="triton"))
    t_torch = bench(lambda: rope.rope_reference(q, k, pos, inv, 1.1))
    moved = 2 * (q.numel() + k.numel()) * q.element_size()  # read + write q and k
    return [{"kernel": "rope q+k", "shape": f"B={B} H={H} KV={KV} T={T} D={D} {dtype}", "triton_ms": t_kernel,
             "torch_ms": t_torch, "speedup": t_torch / t_kernel, "triton_GBps": moved / t_kernel / 1e6}]


def bench_sae(dev, bench, smoke):
    import torch

    from workbench.kernels import sae_decode

    N, K, D = (5, 3, 17) if smoke else (4096, 32, 2304)
    F = 16 * D
    dtype = torch.float32 if smoke else torch.bfloat16
    w = torch.randn(F, D, device=dev, dtype=dtype) / D ** 0.5
    b = torch.randn(D, device=dev, dtype=dtype)
    vals = torch.rand(N, K, device=dev)
    idx = torch.randint(0, F, (N, K), device=dev)
    got = sae_decode.sae_decode(idx, vals, w, b, impl="triton")
    torch.testing.assert_close(got.float(), sae_decode.sae_decode_reference(idx, vals, w, b).float(),
                               atol=0.05, rtol=0.02)
    t_kernel = bench(lambda: sae_decode.sae_decode(idx, vals, w, b, impl="triton"))
    t_torch = bench(lambda: sae_decode.sae_decode_reference(idx, vals, w, b))
    moved = (N * K * D + N * D) * w.element_size() + N * K * 12  # gathered rows, output, idx + vals
    return [{"kernel": "sae top-k decode", "shape": f"N={N} k={K} d={D} F={F} {dtype}", "triton_ms": t_kernel,
             "torch_ms": t_torch, "speedup": t_torch / t_kernel, "triton_GBps": moved / t_kernel / 1e6}]


def torch_lora_loop(x, a, bt, groups, out):
    """The usual torch baseline: for each adapter in the batch, gather its rows, two matmuls, scatter-add."""
    for s, rows in groups:
        out.index_add_(0, rows, (x.index_select(0, rows) @ a[s].T) @ bt[s])
    return out


def bench_lora(dev, bench, smoke):
    import torch

    from workbench.kernels import lora

    K, N, S = (37, 53, 3) if smoke else (576, 1536, 8)  # SmolLM2-135M: hidden 576, MLP 1536
    dtype = torch.float32 if smoke else torch.bfloat16
    rows = []
    for r in ([5] if smoke else [8, 16]):
        a = (torch.randn(S, r, K, device=dev) / K ** 0.5).to(dtype)
        bt = (torch.randn(S, r, N, device=dev) / r ** 0.5).to(dtype)
        for R in ([3] if smoke else [1, 4, 16, 64]):
            x = torch.randn(R, K, device=dev, dtype=dtype)
            idx = torch.randint(0, S, (R,), device=dev)
            used = idx.unique()
            # the row lists are built once, outside the timing: the baseline pays no host sync for them
            groups = [(s, (idx == s).nonzero()[:, 0]) for s in used.tolist()]
            out0 = torch.randn(R, N, device=dev, dtype=dtype)

            def kernel(out):
                y = lora.bgmv_shrink(x, a, idx, impl="triton")  # noqa: B023
                return lora.bgmv_expand(y, bt, idx, out=out, impl="triton")  # noqa: B023

            want = torch_lora_loop(x, a, bt, groups, out0.clone())
            torch.testing.assert_close(kernel(out0.clone()).float(), want.float(), atol=0.05, rtol=0.02)
            out = out0.clone()
            t_kernel = bench(lambda: kernel(out))  # noqa: B023
            t_torch = bench(lambda: torch_lora_loop(x, a, bt, groups, out))  # noqa: B023
            # x, the used slots of both pools, out read + written (dtype); y written + read (fp32); idx twice
            moved = (R * K + used.numel() * r * (K + N) + 2 * R * N) * x.element_size() + 8 * R * r + 16 * R
            rows.append({"kernel": "bgmv shrink+expand", "shape": f"R={R} K={K} N={N} r={r} S={S} {dtype}",
                         "triton_ms": t_kernel, "torch_ms": t_torch, "speedup": t_torch / t_kernel,
                         "triton_GBps": moved / t_kernel / 1e6})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes in the CPU interpreter (no GPU needed)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("bench_kernels: no CUDA device; run on a GPU, or pass --smoke for an interpreter check",
              file=sys.stderr)
        return 2
    dev = "cpu" if args.smoke else "cuda"
    bench = timer(args.smoke)
    rows = []
    for part in (bench_sampler, bench_verify, bench_rope, bench_sae, bench_lora):
        rows += part(dev, bench, args.smoke)
    print(f"{'kernel':<20} {'shape':<42} {'triton ms':>10} {'torch ms':>10} {'speedup':>8} {'GB/s':>8}")
    for r in rows:
        gbps = f"{r['triton_GBps']:.0f}" if "triton_GBps" in r else "-"
        print(f"{r['kernel']:<20} {r['shape']:<42} {r['triton_ms']:>10.4f} {r['torch_ms']:>10.4f} "
              f"{r['speedup']:>8.2f} {gbps:>8}")
    out = {"device": "cpu (Triton interpreter, smoke)" if args.smoke else torch.cuda.get_device_name(),
           "torch": torch.__version__, "smoke": args.smoke, "rows": rows}
    write_json(args.json, {**provenance(), **out})
    return 0


if __name__ == "__main__":
    sys.exit(main())
