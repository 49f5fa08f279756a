"""The one result type every strategy returns, and the streamed event."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class TokenLogprob:
    """A chosen token's log-probability under the processed distribution it was drawn from (``log_softmax`` of
    the logits after penalties, bias, temperature and filters), and the ``top`` most likely alternatives
    ``[(token_id, logprob), ...]``, best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logp: torch.Tensor, tokens: Sequence[int], top: Sequence[int | None]
                   ) -> list[TokenLogprob | None]:
    """Row ``i`` of the log-probabilities ``logp [N, V]`` chose ``tokens[i]``: its logprob and the ``top[i]`` best
    alternatives (None where ``top[i]`` is None)."""
    kmax = max((k for k in top if k), default=0)
    best = torch.topk(logp, kmax, -1) if kmax else None
    chosen = logp.gather(1, torch.as_tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
    out: list[TokenLogprob | None] = []
    for i, k in enumerate(top):
        if k is None:
            out.append(None)
            continue
        alts = tuple(zip(best.indices[i, :k].tolist(), best.values[i, :k].tolist(), strict=True)) if k else ()
        out.append(TokenLogprob(tokens[i], chosen[i], alts))
    return out


@dataclass(frozen=True)
class TokenEvent:
    """One streamed step of one request: the token, the text it completed (may be empty), and whether it ended."""

    index: int
    token_id: int
    text: str
    finished: bool
    finish_reason: str | None  # "eos" | "stop" | "length" once finished
    logprob: TokenLogprob | None = None  # when the request asked for logprobs (None for an EOS token)


@dataclass
class GenerationResult:
    """What a strategy produced for one prompt. ``token_ids`` exclude the EOS that ended the request;
    ``logprobs`` (one per token id, when asked for); ``stats``: the strategy's own figures (``BeamStats``,
    ``SpeculativeStats``, ``MCTSStats``; None for plain sampling)."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "eos" | "stop" | "length"
    logprobs: list[TokenLogprob] | None = None
    stats: object | None = None
