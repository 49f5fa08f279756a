"""Compile every Triton kernel ahead of time for a CUDA architecture, down to a cubin, without a GPU.

Triton's CPU interpreter (``TRITON_INTERPRET=1``, what the tests use without a GPU) does not type-check the
way the compiler does, so a kernel can pass every interpreter test and still fail to compile. This check
runs the real front end, optimiser and the bundled ptxas for one target::

    python -m workbench.kernels.aot_check --arch 90     # sm_90 (H100 / H200); exit status 1 on any failure

It must run in a process where the interpreter is off when Triton is first imported.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator

import torch

_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.int64: "*i64",
        torch.int32: "*i32"}


def signature(args: dict) -> tuple[dict, dict]:
    """Triton signature and constexprs from ``{name: torch dtype (a pointer) | int | float | ("c", value)}``."""
    sig, const = {}, {}
    for name, v in args.items():
        if isinstance(v, torch.dtype):
            sig[name] = _PTR[v]
        elif isinstance(v, tuple):
            sig[name], const[name] = "constexpr", v[1]
        else:
            sig[name] = "fp32" if isinstance(v, float) else "i32"
    return sig, const


def cases() -> Iterator[tuple[str, Callable, dict]]:
    """(name, kernel factory, argument types) for every kernel and the variants the launchers use."""
    from workbench.kernels import lora, rope, sae_decode, sampling, spec_verify

    f32, i32, i64 = torch.float32, torch.int32, torch.int64
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        tag = str(dt).removeprefix("torch.")
        for on_device in (False, True):  # the step counter as an argument, or read from a device buffer
            yield (f"sampling {tag} offset_ptr={on_device}", sampling._kernel, dict(
                logits_ptr=dt, stride=1, temp_ptr=f32, topk_ptr=i32, topp_ptr=f32, minp_ptr=f32, seed_ptr=i64,
                out_ptr=i64, offset=i64 if on_device else 1, V=1, BLOCK=("c", 1024),
                ROUNDS=("c", sampling.MAX_ROUNDS), OFFSET_PTR=("c", on_device)))
        yield (f"rope {tag}", rope._kernel, dict(
            q_ptr=dt, k_ptr=dt, qo_ptr=dt, ko_ptr=dt, pos_ptr=i64, freq_ptr=f32, factor=1.0, H=1, KV=1, T=1,
            sqb=1, sqh=1, sqt=1, skb=1, skh=1, skt=1, HALF=("c", 64), BLOCK=("c", 64)))
        for has_b in (True, False):
            yield (f"sae_decode {tag} bias={has_b}", sae_decode._kernel, dict(
                idx_ptr=i64, val_ptr=f32, w_ptr=dt, b_ptr=dt, out_ptr=dt, K=1, D=1, HAS_B=("c", has_b),
                BLOCK=("c", 1024)))
        yield (f"lora bgmv_shrink {tag}", lora._bgmv_shrink_kernel, dict(
            x_ptr=dt, a_ptr=dt, idx_ptr=i64, y_ptr=f32, K=1, RANK=1, sx=1, BLOCK_R=("c", 8), BLOCK_K=("c", 512)))
        yield (f"lora sgmv_shrink {tag}", lora._sgmv_shrink_kernel, dict(
            x_ptr=dt, a_ptr=dt, start_ptr=i64, slot_ptr=i64, y_ptr=f32, K=1, RANK=1, sx=1, F32_DOT=("c", False),
            BLOCK_M=("c", 32), BLOCK_R=("c", 16), BLOCK_K=("c", 64)))
        for add in (True, False):
            yield (f"lora bgmv_expand {tag} add={add}", lora._bgmv_expand_kernel, dict(
                y_ptr=f32, b_ptr=dt, idx_ptr=i64, out_ptr=dt, RANK=1, N=1, so=1, ADD=("c", add),
                BLOCK_R=("c", 16), BLOCK_N=("c", 128)))
            yield (f"lora sgmv_expand {tag} add={add}", lora._sgmv_expand_kernel, dict(
                y_ptr=f32, b_ptr=dt, start_ptr=i64, slot_ptr=i64, out_ptr=dt, RANK=1, N=1, so=1, ADD=("c", add),
                BLOCK_M=("c", 32), BLOCK_N=("c", 128)))
    for has_q in (True, False):
        yield (f"spec_verify draft_probs={has_q}", spec_verify._kernel, dict(
            d_ptr=i64, q_ptr=f32, p_ptr=f32, ua_ptr=f32, us_ptr=f32, n_ptr=i64, out_ptr=i64, K=1, V=1,
            HAS_Q=("c", has_q), BLOCK=("c", 1024)))


def compile_all(arch: int = 90) -> list[tuple[str, str | None]]:
    """``[(case, None | error text)]`` after compiling every case for ``sm_<arch>``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from workbench.kernels._launch import interpreting

    if interpreting():
        raise RuntimeError("TRITON_INTERPRET is on: compile in a process started without it")
    out = []
    for name, factory, args in cases():
        kernel = factory()
        if list(args) != kernel.arg_names:
            out.append((name, f"argument list out of date: kernel takes {kernel.arg_names}"))
            continue
        sig, const = signature(args)
        try:
            compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=const),
                                      target=GPUTarget("cuda", arch, 32))
            out.append((name, None if compiled.asm.get("cubin") else "no cubin produced"))
        except Exception as e:  # report every kernel, not only the first failure
            out.append((name, f"{type(e).__name__}: {e}"))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (80: A100, 90: H100)")
    args = ap.parse_args(argv)
    results = compile_all(args.arch)
    for name, err in results:
        print(f"{name:<36} {'ok' if err is None else 'FAILED'}")
        if err:
            print("    " + err.replace("\n", "\n    "))
    return 1 if any(err for _, err in results) else 0


if __name__ == "__main__":
    sys.exit(main())
