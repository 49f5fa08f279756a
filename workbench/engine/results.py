"""The one result type every strategy returns, and the streamed event."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TokenLogprob:
    """A chosen token's log-probability under the processed distribution it was drawn from (``log_softmax`` of
    the logits after penalties, bias, temperature and filters), and the ``top`` most likely alternatives
    ``[(token_id, logprob), ...]``, best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


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
