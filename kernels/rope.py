"""Rotary position embedding applied to q and k in one launch, with any (scaled) inverse frequencies.

RoPE (Su et al. 2021) in the half-split layout used by Llama/HF: for ``x = [x1, x2]`` and angle
``theta_i = pos * inv_freq_i``: ``[x1 cos - x2 sin, x2 cos + x1 sin]``, with cos and sin multiplied by the
attention factor (YaRN's mscale, Peng et al. 2023; 1.0 otherwise). Scaling methods (linear / position
interpolation, NTK, YaRN, Llama-3) only change ``inv_freq`` and the factor, so pass what
``transformers``' rope init functions or ``workbench.context`` compute. The angles are computed in fp32
in-kernel from the positions (no cos/sin cache is read) and the rotation is done in fp32, so half-precision
outputs are rounded once (HF rounds cos/sin and each product: expect bf16-level differences, not more).
"""

from __future__ import annotations

import functools

import torch

from workbench.kernels._launch import check, resolve_impl, same_device


def _check(q, k, positions, inv_freq):
    check(q.dim() == 4 and k.dim() == 4, "q and k must be [batch, heads, seq, head_dim]")
    B, _, T, D = q.shape
    check(k.shape[0] == B and k.shape[2] == T and k.shape[3] == D, f"k {tuple(k.shape)} does not match q "
                                                                  f"{tuple(q.shape)} in batch, seq, head_dim")
    check(D % 2 == 0, f"head_dim must be even, got {D}")
    check(positions.shape == (B, T), f"positions must be [batch, seq] = {(B, T)}, got {tuple(positions.shape)}")
    check(inv_freq.shape == (D // 2,), f"inv_freq must be [head_dim / 2] = [{D // 2}], got {tuple(inv_freq.shape)}")
    check(q.dtype == k.dtype and q.dtype in (torch.float32, torch.float16, torch.bfloat16),
          f"q and k must share a float dtype, got {q.dtype} and {k.dtype}")
    check(not positions.is_floating_point(), "positions must be integers")
    same_device(q, k, positions, inv_freq)


def rope_reference(q, k, positions, inv_freq, attention_factor: float = 1.0):
    """Torch reference, as HF computes it: cos/sin in fp32, cast to the input dtype, then rotate."""
    _check(q, k, positions, inv_freq)
    freqs = positions[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), -1)
    cos = (emb.cos() * attention_factor).to(q.dtype)[:, None]
    sin = (emb.sin() * attention_factor).to(q.dtype)[:, None]

    def rot(x):
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin

    return rot(q), rot(k)


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr, freq_ptr, factor, H, KV, T,
                    sqb, sqh, sqt, skb, skh, skt, HALF: tl.constexpr, BLOCK: tl.constexpr):
        bt = tl.program_id(0)
        head = tl.program_id(1)
        b = bt // T
        t = bt % T
        pos = tl.load(pos_ptr + bt).to(tl.float32)
        i = tl.arange(0, BLOCK)
        m = i < HALF
        ang = pos * tl.load(freq_ptr + i, mask=m, other=0.0)
        c = tl.cos(ang) * factor
        s = tl.sin(ang) * factor
        if head < H:
            src = q_ptr + b * sqb + head * sqh + t * sqt
            dst = qo_ptr + b * sqb + head * sqh + t * sqt
        else:
            src = k_ptr + b * skb + (head - H) * skh + t * skt
            dst = ko_ptr + b * skb + (head - H) * skh + t * skt
        x1 = tl.load(src + i, mask=m, other=0.0)
        x2 = tl.load(src + HALF + i, mask=m, other=0.0)
        out_t = x1.dtype
        x1 = x1.to(tl.float32)
        x2 = x2.to(tl.float32)
        tl.store(dst + i, (x1 * c - x2 * s).to(out_t), mask=m)  # fp32 maths, one rounding at the store
        tl.store(dst + HALF + i, (x2 * c + x1 * s).to(out_t), mask=m)

    return rope_kernel


def apply_rope(q, k, positions, inv_freq, attention_factor: float = 1.0, impl: str = "auto"):
    """Return rotated ``(q, k)`` (new tensors). ``q``: [B, H, T, D], ``k``: [B, KV, T, D], ``positions``: [B, T]."""
    _check(q, k, positions, inv_freq)
    if resolve_impl(impl, q) == "torch":
        return rope_reference(q, k, positions, inv_freq, attention_factor)
    q, k = q.contiguous(), k.contiguous()
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    B, H, T, D = q.shape
    KV = k.shape[1]
    half = D // 2
    _kernel()[(B * T, H + KV)](q, k, qo, ko, positions.contiguous(), inv_freq.float().contiguous(),
                                float(attention_factor), H, KV, T, q.stride(0), q.stride(1), q.stride(2),
                                k.stride(0), k.stride(1), k.stride(2), HALF=half,
                                BLOCK=max(16, 1 << (half - 1).bit_length()))
    return qo, ko
