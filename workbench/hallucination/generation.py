"""Answer generation for hallucination detection: the greedy answer with its per-token statistics and hidden
states (recorded while it is generated), and sampled answers for semantic entropy.

:func:`generate_answers` runs :meth:`Engine.generate <workbench.engine.Engine.generate>` greedily with
``workbench.interp.Hooks`` on ``blocks.{i}.hook_resid_post`` and ``ln_final.hook_normalized``; the hooks keep
the last position of every forward (the prefill's last prompt token, then each decoded token). From them:

- the next-token distribution of every generated token, including the EOS that ended the answer
  (``lm_head`` of the recorded final-norm output): its log-probability and entropy (nats), at temperature 1
  with no filter, i.e. the model's own distribution, which greedy decoding takes the argmax of;
- hidden states at two positions, named as in Kossen et al. 2024: ``"tbg"`` (token before generation: the last
  prompt token, available before any answer token exists) and ``"slt"`` (the input of the step that produced
  the last generated token: the answer's last token when an EOS ended it, else the second-last token).

No forward runs beyond the generation itself. :func:`sample_answers` draws ``n`` answers per prompt at a
temperature, prefilling each prompt once and copying its cache rows with
:meth:`Session.regroup <workbench.engine.step.Session.regroup>`; each sample ``j`` has its own seed, so it is the
answer :meth:`Engine.generate` gives for the same prompt and seed.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from workbench.engine.config import GenerationConfig, SamplingParams
from workbench.engine.results import GenerationResult, token_logprobs

log = logging.getLogger(__name__)

POSITIONS = ("tbg", "slt")
DEFAULT_INSTRUCTION = "Answer the question with a short answer only: a few words, no full sentence."
DEFAULT_SHOTS = (("What is the capital of Italy?", "Rome"), ("Who wrote Hamlet?", "William Shakespeare"),
                 ("What is the chemical symbol for iron?", "Fe"))


@dataclass(frozen=True)
class AnswerConfig:
    """How questions become prompts and how the main (greedy) answer is generated.

    ``instruction`` goes in the system turn (None: the chat template's default system prompt), ``shots`` are
    (question, answer) turns before the question; ``chat=False`` writes ``Q: ... A: ...`` lines instead of the
    chat template. ``layers``: the blocks whose ``hook_resid_post`` is recorded (None: all).
    """

    instruction: str | None = DEFAULT_INSTRUCTION
    shots: tuple[tuple[str, str], ...] = DEFAULT_SHOTS
    chat: bool = True
    max_new_tokens: int = 16
    stop_strings: tuple[str, ...] = ("\n",)
    eos_token_ids: tuple[int, ...] | None = None  # None: the model's / tokenizer's
    layers: tuple[int, ...] | None = None
    batch_size: int = 16

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if isinstance(self.stop_strings, str):
            raise ValueError("stop_strings must be a tuple of strings")


@dataclass
class Generation:
    """One question's greedy answer and what the detectors read from it.

    ``token_logprobs`` / ``token_entropies``: one per scored step (every generated token, plus the EOS that
    ended the answer, if one did); ``features[position]``: ``[len(layers), d_model]`` float32 residual-stream
    states after the blocks in ``layers``.
    """

    question: str
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    token_logprobs: list[float]
    token_entropies: list[float]
    layers: tuple[int, ...] = ()
    features: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def answer(self) -> str:
        return self.text.strip()

    def feature(self, position: str, layer: int) -> np.ndarray:
        if position not in self.features:
            raise KeyError(f"no {position!r} hidden states recorded (have {sorted(self.features)})")
        if layer not in self.layers:
            raise KeyError(f"layer {layer} was not recorded (recorded: {list(self.layers)})")
        return self.features[position][self.layers.index(layer)]

    def to_json(self) -> dict:
        """Everything but the hidden states (JSON-serialisable)."""
        return {"question": self.question, "prompt_ids": self.prompt_ids, "token_ids": self.token_ids,
                "text": self.text, "finish_reason": self.finish_reason, "token_logprobs": self.token_logprobs,
                "token_entropies": self.token_entropies, "layers": list(self.layers)}

    @classmethod
    def from_json(cls, d: dict, features: dict[str, np.ndarray] | None = None) -> Generation:
        return cls(d["question"], d["prompt_ids"], d["token_ids"], d["text"], d["finish_reason"],
                   d["token_logprobs"], d["token_entropies"], tuple(d["layers"]), features or {})


def answer_messages(question: str, config: AnswerConfig = AnswerConfig()) -> list[dict]:
    msgs = [{"role": "system", "content": config.instruction}] if config.instruction else []
    for q, a in config.shots:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return msgs + [{"role": "user", "content": question}]


def answer_prompt(tokenizer, question: str, config: AnswerConfig = AnswerConfig()) -> list[int]:
    """Prompt token ids for ``question`` (chat template, or plain ``Q:/A:`` lines when ``config.chat`` is False)."""
    from workbench.chat import prompt_ids

    if config.chat:
        return prompt_ids(tokenizer, answer_messages(question, config))
    lines = [config.instruction] if config.instruction else []
    lines += [f"Q: {q}\nA: {a}" for q, a in config.shots]
    lines.append(f"Q: {question}\nA:")
    return tokenizer("\n".join(lines))["input_ids"]


def logits_from_normalized(model, h: torch.Tensor) -> torch.Tensor:
    """The LM head on final-norm outputs (with Gemma-style final logit soft-capping when configured)."""
    head = model.get_output_embeddings()
    logits = head(h.to(head.weight.dtype)).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = cap * torch.tanh(logits / cap)
    return logits


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of ``softmax(logits)`` along the last axis."""
    logp = torch.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).nan_to_num().sum(-1)


class _Recorder:
    """Hook functions keeping the last position of every forward at each hook point."""

    def __init__(self):
        self.calls: dict[str, list[torch.Tensor]] = defaultdict(list)

    def __call__(self, act: torch.Tensor, hook) -> None:
        self.calls[hook.name].append(act[:, -1].detach().float().cpu())

    def stacked(self, name: str, skip: int) -> torch.Tensor:
        """``[calls - skip, B, d]`` (``skip``: the earlier prefill chunks)."""
        return torch.stack(self.calls[name][skip:])


def generate_answers(engine, questions: Sequence[str], config: AnswerConfig = AnswerConfig()) -> list[Generation]:
    """Greedy answers to ``questions`` with per-token log-probabilities, entropies and hidden states."""
    from workbench.interp.hooks import Hooks, hook_names

    model, tok = engine.model, engine.tokenizer
    n_layers = sum(1 for n in hook_names(model) if n.endswith(".hook_resid_post"))
    layers = tuple(range(n_layers)) if config.layers is None else tuple(config.layers)
    if not layers or any(not 0 <= i < n_layers for i in layers):
        raise ValueError(f"layers must be in [0, {n_layers}), got {layers}")
    names = [f"blocks.{i}.hook_resid_post" for i in layers] + ["ln_final.hook_normalized"]
    gen_cfg = GenerationConfig(max_new_tokens=config.max_new_tokens, stop_strings=tuple(config.stop_strings),
                               eos_token_ids=config.eos_token_ids)
    out: list[Generation] = []
    for b in range(0, len(questions), config.batch_size):
        batch = list(questions[b: b + config.batch_size])
        prompts = [answer_prompt(tok, q, config) for q in batch]
        rec = _Recorder()
        with Hooks(model, [(n, rec) for n in names]):
            results = engine.generate(prompts, gen_cfg)
        skip = math.ceil(max(len(p) for p in prompts) / engine.prefill_chunk) - 1
        normed = rec.stacked("ln_final.hook_normalized", skip)  # [calls, B, d]
        resid = torch.stack([rec.stacked(n, skip) for n in names[:-1]], 2)  # [calls, B, layers, d]
        with torch.no_grad():
            for r, (q, res) in enumerate(zip(batch, results, strict=True)):
                out.append(_generation(model, q, res, normed[:, r], resid[:, r], layers))
        log.info("answered %d / %d questions", len(out), len(questions))
    return out


def _generation(model, question: str, res: GenerationResult, normed: torch.Tensor, resid: torch.Tensor,
                layers: tuple[int, ...]) -> Generation:
    n = len(res.token_ids) + (1 if res.finish_reason == "eos" else 0)  # scored steps (the EOS too)
    n = max(n, 1)
    if n > normed.shape[0]:
        raise RuntimeError(f"recorded {normed.shape[0]} forwards for {n} generated tokens")
    logits = logits_from_normalized(model, normed[:n])
    logp = torch.log_softmax(logits, -1)
    chosen = list(res.token_ids)
    if len(chosen) < n:  # the EOS (greedy: the argmax of its step) or an empty answer
        chosen.append(int(logp[len(chosen)].argmax()))
    lps = logp.gather(1, torch.tensor(chosen[:n])[:, None])[:, 0]
    return Generation(question, list(res.prompt_ids), list(res.token_ids), res.text, res.finish_reason,
                      lps.tolist(), entropy(logits).tolist(), layers,
                      {"tbg": resid[0].numpy().copy(), "slt": resid[n - 1].numpy().copy()})


# -- sampling ---------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One sampled answer: its tokens, text and the log-probability of every drawn token (under the
    distribution it was drawn from) including the EOS that ended it, if one did."""

    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[float]

    @property
    def answer(self) -> str:
        return self.text.strip()

    def mean_logprob(self) -> float:
        """Length-normalised log-likelihood (mean over the drawn tokens)."""
        return float(np.mean(self.logprobs)) if self.logprobs else 0.0

    def to_json(self) -> dict:
        return {"token_ids": self.token_ids, "text": self.text, "finish_reason": self.finish_reason,
                "logprobs": self.logprobs}

    @classmethod
    def from_json(cls, d: dict) -> Sample:
        return cls(d["token_ids"], d["text"], d["finish_reason"], d["logprobs"])


def sample_answers(engine, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams, *,
                   max_new_tokens: int = 16, stop_strings: Sequence[str] = ("\n",), seed: int = 0,
                   eos_token_ids: tuple[int, ...] | None = None) -> list[list[Sample]]:
    """``n`` samples per prompt; sample ``j`` is drawn with seed ``seed + j`` (the same answer as
    ``engine.generate([prompt], GenerationConfig(..., seed=seed + j))``). Each prompt is prefilled once."""
    from workbench.engine import processors
    from workbench.engine import sampling as sampling_mod

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ids = engine.encode_all([list(p) for p in prompts])
    keep = [i for i in range(len(ids)) for _ in range(n)]
    cfgs = [GenerationConfig(max_new_tokens=max_new_tokens, sampling=sampling, stop_strings=tuple(stop_strings),
                             seed=seed + j, eos_token_ids=eos_token_ids, logprobs=0)
            for _ in ids for j in range(n)]
    stops = [engine.stopper(ids[i], c.max_new_tokens, eos_token_ids=c.eos_token_ids, stop_strings=c.stop_strings,
                            logprobs=0) for i, c in zip(keep, cfgs, strict=True)]
    gens = [engine.generator(c.seed) for c in cfgs]
    eos_lp: dict[int, float] = {}
    B, dev = len(keep), engine.device
    with torch.inference_mode():
        session = engine.start(ids, 0)
        session.regroup(keep, extra=max_new_tokens)
        seen = torch.zeros((B, engine.vocab_size), dtype=torch.bool, device=dev)
        counts = torch.zeros((B, engine.vocab_size), dtype=torch.int32, device=dev)
        for r, i in enumerate(keep):
            seen[r, torch.tensor(ids[i], device=dev)] = True
        params = [c.sampling for c in cfgs]
        greedy = [p.greedy for p in params]
        logits = session.logits
        with session.decoding():
            for _ in range(max_new_tokens):
                x = processors.process(logits, params, seen, counts)
                tokens = sampling_mod.choose(x, greedy, gens)
                live = torch.tensor([r for r, s in enumerate(stops) if not s.done], device=dev)
                seen[live, tokens[live]] = True
                counts[live, tokens[live]] += 1
                token_list = tokens.tolist()
                lps = token_logprobs(torch.log_softmax(x.float(), -1), token_list, [0] * B)
                for r in live.tolist():
                    _, kept = stops[r].push(token_list[r], lps[r])
                    if not kept:
                        eos_lp[r] = lps[r].logprob
                if all(s.done for s in stops):
                    break
                logits = session.decode(tokens)
    out: list[list[Sample]] = [[] for _ in ids]
    for r, (i, s) in enumerate(zip(keep, stops, strict=True)):
        res = s.result
        lp = [t.logprob for t in res.logprobs or []] + ([eos_lp[r]] if r in eos_lp else [])
        out[i].append(Sample(list(res.token_ids), res.text, res.finish_reason, lp))
    return out
