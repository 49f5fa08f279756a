"""Speculative-decoding verification: accept/reject K draft tokens and draw the next token, in one kernel.

Exact rejection scheme of Leviathan et al. 2023 / Chen et al. 2023: draft ``x_j`` is accepted with probability
``min(1, p_j(x_j) / q_j(x_j))`` (tested as ``u_j * q < p``); at the first rejection the next token is drawn from
``norm(max(0, p_j - q_j))``; if all K are accepted a bonus token is drawn from ``p_K``. The result is distributed
exactly as sampling from the target ``p``. ``draft_probs=None`` means point-mass drafts (q = one-hot: greedy or
n-gram proposers), for which the residual is ``p_j`` with the rejected token removed.
Randomness comes in as uniforms, so the kernel and the torch reference agree draw for draw.
"""

from __future__ import annotations

import functools

import torch

from workbench.kernels._launch import check, resolve_impl, same_device


def _check(draft_tokens, draft_probs, target_probs, u_accept, u_sample):
    check(draft_tokens.dim() == 2, f"draft_tokens must be [B, K], got {tuple(draft_tokens.shape)}")
    B, K = draft_tokens.shape
    check(target_probs.dim() == 3 and target_probs.shape[:2] == (B, K + 1),
          f"target_probs must be [B, K+1, V] = [{B}, {K + 1}, V], got {tuple(target_probs.shape)}")
    V = target_probs.shape[2]
    if draft_probs is not None:
        check(draft_probs.shape == (B, K, V), f"draft_probs must be [B, K, V] = {(B, K, V)}, got "
                                              f"{tuple(draft_probs.shape)}")
        check(draft_probs.dtype == torch.float32, "draft_probs must be float32")
    check(target_probs.dtype == torch.float32, "target_probs must be float32")
    check(u_accept.shape == (B, K) and u_sample.shape == (B,), "u_accept must be [B, K] and u_sample [B]")
    check(draft_tokens.dtype == torch.int64, "draft_tokens must be int64")
    check(bool(((draft_tokens >= 0) & (draft_tokens < V)).all()), f"draft tokens must be in [0, {V})")
    same_device(*(t for t in (draft_tokens, draft_probs, target_probs, u_accept, u_sample) if t is not None))


def verify_reference(draft_tokens, draft_probs, target_probs, u_accept, u_sample):
    """Torch reference. Returns ``(n_accepted [B] int64, tokens [B, K+1] int64)``: the accepted drafts, then the
    corrected or bonus token, then -1."""
    _check(draft_tokens, draft_probs, target_probs, u_accept, u_sample)
    B, K = draft_tokens.shape
    n_acc = torch.zeros(B, dtype=torch.int64, device=draft_tokens.device)
    tokens = torch.full((B, K + 1), -1, dtype=torch.int64, device=draft_tokens.device)
    for b in range(B):
        n = K
        for j in range(K):
            x = int(draft_tokens[b, j])
            qx = 1.0 if draft_probs is None else draft_probs[b, j, x]
            if not u_accept[b, j] * qx < target_probs[b, j, x]:
                n = j
                break
        if n < K:
            q = (torch.nn.functional.one_hot(draft_tokens[b, n], target_probs.shape[2]).float()
                 if draft_probs is None else draft_probs[b, n])
            w = (target_probs[b, n] - q).clamp(min=0)
            if w.sum() <= 0:
                w = target_probs[b, n]
        else:
            w = target_probs[b, K]
        c = torch.cumsum(w, 0)
        hits = ((c > u_sample[b] * c[-1]) & (w > 0)).nonzero()
        pick = int(hits[0]) if len(hits) else int((w > 0).nonzero()[-1])
        n_acc[b] = n
        tokens[b, :n] = draft_tokens[b, :n]
        tokens[b, n] = pick
    return n_acc, tokens


@functools.cache
def _kernel():
    from workbench.kernels._spec_verify_triton import verify_kernel

    return verify_kernel


def verify(draft_tokens, draft_probs, target_probs, u_accept, u_sample, impl: str = "auto"):
    """Verify drafts; see the module docstring. Returns ``(n_accepted [B], tokens [B, K+1])``."""
    _check(draft_tokens, draft_probs, target_probs, u_accept, u_sample)
    if resolve_impl(impl, target_probs) == "torch":
        return verify_reference(draft_tokens, draft_probs, target_probs, u_accept, u_sample)
    B, K = draft_tokens.shape
    V = target_probs.shape[2]
    check(K >= 1, "need at least one draft token")
    n_acc = torch.empty(B, dtype=torch.int64, device=target_probs.device)
    tokens = torch.empty((B, K + 1), dtype=torch.int64, device=target_probs.device)
    q = draft_probs.contiguous() if draft_probs is not None else target_probs  # unused pointer when None
    block = 1024 if V >= 1024 else max(16, 1 << (V - 1).bit_length())
    _kernel()[(B,)](draft_tokens.contiguous(), q, target_probs.contiguous(), u_accept.contiguous().float(),
                    u_sample.contiguous().float(), n_acc, tokens, K, V, HAS_Q=draft_probs is not None,
                    BLOCK=block)
    return n_acc, tokens
