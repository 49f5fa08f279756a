"""Exact float32 long-window attention on CUDA for grouped-query models.

HF's ``sdpa`` attention hands grouped K/V to ``scaled_dot_product_attention(enable_gqa=True)``. In float32 on
CUDA no fused kernel takes that (flash attention needs 16-bit inputs, the memory-efficient kernel has no GQA), so
PyTorch falls back to the math kernel, which materialises ``[heads, L, L]`` scores: 36 GiB at 32k tokens for
SmolLM2, out of memory with the softmax copy. :func:`mha_attention` temporarily switches the model to an
attention function that repeats K/V to every query head first, so the memory-efficient kernel runs in O(L)
memory. The arithmetic is the same attention; only the kernel differs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

NAME = "daert_sdpa_mha"


def sdpa_mha(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
             **_unused):
    """An HF attention function (``AttentionInterface``): SDPA on K/V repeated to the query heads."""
    if getattr(module, "sliding_window", None) or getattr(module.config, "attn_logit_softcapping", None):
        raise ValueError(f"{NAME} handles plain causal attention only (no sliding window, no logit soft-capping)")
    q_len, kv_len = query.shape[2], key.shape[2]
    rep = query.shape[1] // key.shape[1]
    if rep > 1:
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    causal = attention_mask is None and q_len > 1 and (getattr(module, "is_causal", True) if is_causal is None
                                                         else is_causal)
    if causal and kv_len != q_len:
        # SDPA's is_causal aligns the mask top-left, wrong when cached keys precede the queries
        raise ValueError(f"{NAME}: causal attention without a mask needs as many keys as queries "
                         f"(got {kv_len} keys for {q_len} queries)")
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, is_causal=causal,
                                         dropout_p=dropout if module.training else 0.0, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, sdpa_mha)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # same masks as "sdpa" (None for plain causal)


def plain_gqa(cfg) -> bool:
    """A grouped-query model with plain causal attention everywhere (no sliding windows, no soft-capping):
    what :func:`sdpa_mha` computes exactly."""
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    sliding = getattr(cfg, "sliding_window", None) or "sliding_attention" in (getattr(cfg, "layer_types", None) or ())
    return kv < heads and not sliding and not getattr(cfg, "attn_logit_softcapping", None)


def needs_mha(model) -> bool:
    """True where HF's sdpa would hit the math kernel and :func:`sdpa_mha` is exact: float32 weights on CUDA,
    a plain GQA model using sdpa. (Sliding-window models keep HF's path.)"""
    p = next(model.parameters())
    return (p.is_cuda and p.dtype == torch.float32 and model.config._attn_implementation == "sdpa"
            and plain_gqa(model.config))


@contextmanager
def mha_attention(model) -> Iterator[None]:
    """Run ``model`` with :func:`sdpa_mha` inside the block (restored on exit). A no-op unless it uses sdpa."""
    before = model.config._attn_implementation
    if before != "sdpa":
        yield
        return
    _register()
    model.set_attn_implementation(NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(before)
