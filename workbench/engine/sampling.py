"""Token choice from processed logits: argmax for greedy rows, exponential race for sampled rows.

Sampling uses the Gumbel-max equivalent ``argmax(p / E)`` with ``E ~ Exp(1)``, which needs no host sync
(no multinomial) and draws each row's noise from that request's own generator, so a seeded request gives
the same tokens whatever else is in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def choose(logits: torch.Tensor, greedy: Sequence[bool], generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Return ``[B]`` token ids: argmax for greedy rows, one draw from ``softmax(logits)`` for the others."""
    out = logits.argmax(-1)
    if all(greedy):
        return out
    probs = torch.softmax(logits.float(), -1)
    noise = torch.empty_like(probs)
    for row, (g, gen) in enumerate(zip(greedy, generators, strict=True)):
        if not g:
            noise[row].exponential_(generator=gen)
    sampled = (probs / noise).argmax(-1)
    mask = torch.tensor([not g for g in greedy], device=logits.device)
    return torch.where(mask, sampled, out)
