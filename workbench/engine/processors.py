"""Batched logits processors (plain torch, per-row parameters). Each takes and returns ``[B, V]`` float logits.

Filtered-out tokens are set to ``-inf``; every filter keeps at least the most likely token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from workbench.engine.config import SamplingParams

NEG_INF = float("-inf")


def _col(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).unsqueeze(1)


def repetition_penalty(logits, seen: torch.Tensor, penalty: Sequence[float]):
    """CTRL penalty on tokens already seen: positive logits divided by it, negative multiplied."""
    p = _col(penalty, logits)
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalised, logits)


def frequency_presence(logits, counts: torch.Tensor, frequency: Sequence[float], presence: Sequence[float]):
    c = counts.to(logits.dtype)
    return logits - _col(frequency, logits) * c - _col(presence, logits) * (c > 0).to(logits.dtype)


def temperature(logits, temps: Sequence[float]):
    t = _col([t if t > 0 else 1.0 for t in temps], logits)  # greedy rows are argmaxed later
    return logits / t


def top_k(logits, ks: Sequence[int]):
    kmax = max(ks)
    if kmax <= 0:
        return logits
    vocab = logits.shape[-1]
    k = torch.tensor([min(k, vocab) if k > 0 else vocab for k in ks], device=logits.device)
    vals = torch.topk(logits, min(kmax, vocab), dim=-1).values  # [B, kmax], descending
    kth = vals.gather(1, (k.clamp(max=vals.shape[1]) - 1).unsqueeze(1))
    kth = torch.where((k >= vocab).unsqueeze(1), torch.full_like(kth, NEG_INF), kth)
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p(logits, ps: Sequence[float]):
    """Nucleus (Holtzman et al. 2020): drop the least likely tokens whose total mass is <= 1 - p."""
    sorted_logits, idx = torch.sort(logits, descending=False, dim=-1)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    remove = cum <= (1 - _col(ps, logits))
    remove[:, -1] = False
    return logits.masked_fill(remove.scatter(1, idx, remove), NEG_INF)


def min_p(logits, ps: Sequence[float]):
    """Min-p (Nguyen et al. 2024): drop tokens with prob < min_p * max prob."""
    probs = logits.softmax(-1)
    thresh = _col(ps, logits) * probs.max(-1, keepdim=True).values
    return logits.masked_fill(probs < thresh, NEG_INF)


def typical(logits, ps: Sequence[float]):
    """Locally typical sampling (Meister et al. 2023): keep tokens closest to the entropy, mass >= p."""
    logp = logits.log_softmax(-1)
    p = logp.exp()
    ent = -(torch.nan_to_num(p * logp)).sum(-1, keepdim=True)
    shifted = (-logp - ent).abs()
    sorted_scores, idx = torch.sort(shifted, dim=-1)
    cum = logits.gather(-1, idx).softmax(-1).cumsum(-1)
    last = (cum < _col(ps, logits)).sum(-1, keepdim=True).clamp(max=logits.shape[-1] - 1)
    remove = sorted_scores > sorted_scores.gather(1, last)
    return logits.masked_fill(remove.scatter(1, idx, remove), NEG_INF)


def logit_bias(logits, biases: Sequence[dict[int, float]]):
    out = logits.clone()
    for row, bias in enumerate(biases):
        for tok, b in bias.items():
            if tok >= logits.shape[-1]:
                raise ValueError(f"logit_bias token id {tok} >= vocab size {logits.shape[-1]}")
            out[row, tok] += b
    return out


def process(logits: torch.Tensor, params: Sequence[SamplingParams], seen: torch.Tensor, counts: torch.Tensor,
            *, filters: bool = True):
    """Apply every configured processor, skipping those no row uses. ``seen``: prompt+generated tokens
    (bool ``[B, V]``); ``counts``: generated-token counts (``[B, V]``). ``filters=False`` stops after the
    penalties and bias (temperature and the filters are then left to a fused sampling kernel)."""
    x = logits.float()
    if any(p.repetition_penalty != 1.0 for p in params):
        x = repetition_penalty(x, seen, [p.repetition_penalty for p in params])
    if any(p.frequency_penalty or p.presence_penalty for p in params):
        x = frequency_presence(x, counts, [p.frequency_penalty for p in params], [p.presence_penalty for p in params])
    if any(p.logit_bias for p in params):
        x = logit_bias(x, [p.logit_bias for p in params])
    if not filters or all(p.greedy for p in params):
        return x
    x = temperature(x, [p.temperature for p in params])
    if any(p.top_k > 0 for p in params):
        x = top_k(x, [p.top_k for p in params])
    if any(p.top_p < 1.0 for p in params):
        x = top_p(x, [p.top_p for p in params])
    if any(p.min_p > 0.0 for p in params):
        x = min_p(x, [p.min_p for p in params])
    if any(p.typical_p < 1.0 for p in params):
        x = typical(x, [p.typical_p for p in params])
    return x


def fused_kernel_can_sample(params: Sequence[SamplingParams]) -> bool:
    """Whether ``workbench.kernels.sampling`` implements exactly these rows' filters (no typical-p; top-k and
    top-p not combined, since the engine renormalises after top-k and the kernel intersects the filters)."""
    return all(p.typical_p == 1.0 and not (p.top_k > 0 and p.top_p < 1.0) for p in params)
