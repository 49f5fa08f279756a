"""Top-k sparse-autoencoder decode: ``out[n] = sum_j vals[n, j] * W_dec[idx[n, j]] + b_dec``.

A top-k SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders") has only k active latents per
token, so decoding gathers k rows of the decoder instead of a dense ``[N, F] @ [F, d]`` matmul: traffic is
``N * k * d`` elements read instead of ``F * d``, which is what makes wide dictionaries cheap to decode.
Accumulates in fp32.
"""

from __future__ import annotations

import functools

import torch

from workbench.kernels._launch import check, resolve_impl, same_device


def _check(idx, vals, w_dec, b_dec):
    check(idx.dim() == 2 and idx.shape == vals.shape, f"idx and vals must both be [N, k], got "
                                                     f"{tuple(idx.shape)} and {tuple(vals.shape)}")
    check(w_dec.dim() == 2, f"w_dec must be [n_latents, d], got {tuple(w_dec.shape)}")
    check(b_dec is None or b_dec.shape == (w_dec.shape[1],), f"b_dec must be [d] = [{w_dec.shape[1]}]")
    check(not idx.is_floating_point(), "idx must be integer latent indices")
    check(idx.numel() == 0 or bool(((idx >= 0) & (idx < w_dec.shape[0])).all()),
          f"latent indices must be in [0, {w_dec.shape[0]})")
    check(w_dec.dtype in (torch.float32, torch.float16, torch.bfloat16), f"w_dec dtype {w_dec.dtype} unsupported")
    same_device(*(t for t in (idx, vals, w_dec, b_dec) if t is not None))


def sae_decode_reference(idx, vals, w_dec, b_dec=None):
    _check(idx, vals, w_dec, b_dec)
    out = (vals.float()[..., None] * w_dec.float()[idx]).sum(1)
    if b_dec is not None:
        out = out + b_dec.float()
    return out.to(w_dec.dtype)


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def decode_kernel(idx_ptr, val_ptr, w_ptr, b_ptr, out_ptr, K, D, HAS_B: tl.constexpr, BLOCK: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < D
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in range(K):
            i = tl.load(idx_ptr + n * K + j).to(tl.int64)
            v = tl.load(val_ptr + n * K + j).to(tl.float32)
            acc += v * tl.load(w_ptr + i * D + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_B:
            acc += tl.load(b_ptr + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + n * D + cols, acc.to(out_ptr.dtype.element_ty), mask=m)

    return decode_kernel


def sae_decode(idx, vals, w_dec, b_dec=None, impl: str = "auto"):
    """``[N, d]`` decoded activations (dtype of ``w_dec``) from top-k latents ``idx``/``vals`` ``[N, k]``."""
    _check(idx, vals, w_dec, b_dec)
    if resolve_impl(impl, w_dec) == "torch":
        return sae_decode_reference(idx, vals, w_dec, b_dec)
    N, K = idx.shape
    D = w_dec.shape[1]
    out = torch.empty((N, D), dtype=w_dec.dtype, device=w_dec.device)
    block = min(1024, max(16, 1 << (D - 1).bit_length()))
    _kernel()[(N, (D + block - 1) // block)](idx.contiguous(), vals.contiguous(), w_dec.contiguous(),
                                              b_dec if b_dec is not None else w_dec, out, K, D,
                                              HAS_B=b_dec is not None, BLOCK=block)
    return out
