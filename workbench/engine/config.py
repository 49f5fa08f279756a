"""Dataclass configs for generation; every field is validated with a clear message."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """Per-request logits processing. ``temperature == 0`` means greedy (argmax after penalties/bias).

    Order of application (as in HF ``generate``): repetition penalty, frequency/presence penalties,
    logit bias, temperature, top-k, top-p, min-p, typical-p.
    Repetition penalty (CTRL, Keskar et al. 2019) counts prompt + generated tokens, like HF;
    frequency/presence penalties count generated tokens only, like the OpenAI API.
    """

    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)

    def __post_init__(self):
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}"),
            (0.0 < self.typical_p <= 1.0, f"typical_p must be in (0, 1], got {self.typical_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (-2.0 <= self.frequency_penalty <= 2.0, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (-2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        for tok, bias in self.logit_bias.items():
            if not isinstance(tok, int) or tok < 0:
                raise ValueError(f"logit_bias keys must be token ids >= 0, got {tok!r}")
            if bias != bias:
                raise ValueError(f"logit_bias[{tok}] is NaN")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = SamplingParams(temperature=0.0)


MAX_LOGPROBS = 20  # alternatives per token, as the OpenAI API allows


def check_logprobs(k) -> None:
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_LOGPROBS):
        raise ValueError(f"logprobs must be None or an int in [0, {MAX_LOGPROBS}], got {k!r}")


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128
    sampling: SamplingParams = GREEDY
    stop_strings: tuple[str, ...] = ()
    eos_token_ids: tuple[int, ...] | None = None  # None: the tokenizer's / model's EOS
    ignore_eos: bool = False
    seed: int | None = None  # per request: same seed, same output, whatever the batch
    constraint: object | None = None  # constrained.Regex / constrained.JsonSchema: output must match it
    logprobs: int | None = None  # None: off; k: each token's logprob and the k best alternatives (0 to 20)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        check_logprobs(self.logprobs)
        if isinstance(self.stop_strings, str):
            raise ValueError("stop_strings must be a tuple of strings, not one string")
        if any(not s for s in self.stop_strings):
            raise ValueError("stop_strings must be non-empty strings")
        if not isinstance(self.sampling, SamplingParams):
            raise ValueError(f"sampling must be a SamplingParams, got {type(self.sampling).__name__}")
        if self.constraint is not None and not callable(getattr(self.constraint, "to_regex", None)):
            raise ValueError("constraint must be a workbench.engine.constrained.Regex or JsonSchema, "
                             f"got {type(self.constraint).__name__}")
        if self.constraint is not None and self.ignore_eos:
            raise ValueError("a constrained request ends with EOS once its pattern is complete: "
                             "ignore_eos=True cannot be combined with constraint")


@dataclass(frozen=True)
class BeamConfig:
    """Beam search as in HF ``generate(num_beams=...)``.

    ``length_penalty``: finished hypotheses are ranked by ``sum_logprob / generated_len ** length_penalty``
    (> 0 favours longer outputs); ``early_stopping``: True stops a prompt once ``num_beams`` hypotheses are
    finished, False stops when no running beam can still beat the worst finished one (heuristic at the current
    length), ``"never"`` uses the exact bound (canonical beam search).
    """

    num_beams: int = 4
    max_new_tokens: int = 64
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    eos_token_ids: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 1 <= self.num_return_sequences <= self.num_beams:
            raise ValueError(f"num_return_sequences must be in [1, num_beams={self.num_beams}], "
                             f"got {self.num_return_sequences}")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
