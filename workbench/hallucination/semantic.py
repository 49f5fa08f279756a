"""Semantic entropy (Farquhar et al. 2024, Nature) and the judges that decide when two answers mean the same.

For a question, ``n`` answers are sampled at a temperature; they are clustered by bidirectional entailment
(answer ``i`` opens a cluster and takes every later unclustered answer equivalent to it, as in the authors'
``get_semantic_ids``); a cluster's probability is the sum of its members' likelihoods, normalised over the
samples, with each answer's likelihood ``exp(mean token log-probability)`` (length-normalised); the semantic
entropy is ``-sum_c p(c) log p(c)``. The discrete variant uses the cluster frequencies instead
(``p(c) = |c| / n``), which needs no likelihoods.

Judges (objects with ``equivalent(question, anchor, others) -> list[bool]``), by exact name in
:data:`JUDGES`:

- ``exact-match`` (:class:`ExactMatchJudge`, the default, works offline with no extra model): two answers are
  equivalent when their normalised strings (:func:`workbench.hallucination.qa.normalize_answer`) are equal.
  Right for one-entity answers ("Paris" = "paris."); wrong for paraphrases ("Paris" vs "Paris, France", "8" vs
  "eight" fall in different clusters), which inflates the entropy of verbose or varied answers.
- ``nli`` (:class:`NLIJudge`): a sequence-classification NLI model (DeBERTa-MNLI style; labels read from
  ``config.id2label``) from a local folder, or from the hub by name when online; equivalence needs entailment
  both ways (``strict=True``, the paper's rule) or, with ``strict=False``, no contradiction either way and not
  both neutral (the authors' non-strict option). Each text is prefixed with the question, as the authors do.
- ``lm`` (:class:`LMJudge`): the generating model itself, asked the authors' LLM-entailment prompt ("Does
  Possible Answer 1 semantically entail Possible Answer 2? Respond with entailment, contradiction, or
  neutral.") in both directions; the label is the one whose first token is most probable in the reply. A
  small model is a poor judge (it is biased towards one label whatever the answers), and it costs two
  forwards per compared pair.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from workbench.errors import ModelUnavailableError, UnknownNameError
from workbench.hallucination.generation import Sample, sample_answers
from workbench.hallucination.qa import normalize_answer

log = logging.getLogger(__name__)

CONTRADICTION, NEUTRAL, ENTAILMENT = 0, 1, 2
LABEL_WORDS = ("contradiction", "neutral", "entailment")


def semantic_entropy(log_likelihoods: Sequence[float], cluster_ids: Sequence[int]) -> float:
    """``-sum_c p(c) log p(c)`` with ``log p(c) = logsumexp(ll[c]) - logsumexp(ll)``."""
    ll = np.asarray(log_likelihoods, dtype=float)
    ids = np.asarray(cluster_ids)
    if ll.shape != ids.shape or ll.size == 0:
        raise ValueError(f"need one cluster id per log-likelihood, got {ids.size} and {ll.size}")
    total = np.logaddexp.reduce(ll)
    lp = np.array([np.logaddexp.reduce(ll[ids == c]) - total for c in np.unique(ids)])
    return float(-(np.exp(lp) * lp).sum())


def discrete_semantic_entropy(cluster_ids: Sequence[int]) -> float:
    """Entropy of the cluster frequencies."""
    _, counts = np.unique(np.asarray(cluster_ids), return_counts=True)
    if counts.size == 0:
        raise ValueError("no cluster ids")
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def cluster_answers(question: str, answers: Sequence[str], judge) -> list[int]:
    """Cluster ids ``0, 1, ...`` in order of first appearance."""
    ids = [-1] * len(answers)
    nxt = 0
    for i in range(len(answers)):
        if ids[i] != -1:
            continue
        ids[i] = nxt
        rest = [j for j in range(i + 1, len(answers)) if ids[j] == -1]
        if rest:
            same = judge.equivalent(question, answers[i], [answers[j] for j in rest])
            if len(same) != len(rest):
                raise RuntimeError(f"judge returned {len(same)} decisions for {len(rest)} answers")
            for j, s in zip(rest, same, strict=True):
                if s:
                    ids[j] = nxt
        nxt += 1
    return ids


def bidirectional(forward: int, backward: int, strict: bool = True) -> bool:
    """Equivalence from the two directional NLI labels."""
    if strict:
        return forward == ENTAILMENT and backward == ENTAILMENT
    return CONTRADICTION not in (forward, backward) and not (forward == NEUTRAL and backward == NEUTRAL)


# -- judges -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExactMatchJudge:
    name: str = "exact-match"

    def equivalent(self, question: str, anchor: str, others: Sequence[str]) -> list[bool]:
        a = normalize_answer(anchor)
        return [normalize_answer(o) == a for o in others]


class _EntailmentJudge:
    """Shared by the NLI and LM judges: ``labels(question, premises, hypotheses)`` gives directional labels."""

    strict: bool = True

    def labels(self, question: str, premises: Sequence[str], hypotheses: Sequence[str]) -> list[int]:
        raise NotImplementedError

    def equivalent(self, question: str, anchor: str, others: Sequence[str]) -> list[bool]:
        others = list(others)
        if not others:
            return []
        k = len(others)
        lab = self.labels(question, [anchor] * k + others, others + [anchor] * k)
        return [bidirectional(f, b, self.strict) for f, b in zip(lab[:k], lab[k:], strict=True)]


def nli_label_codes(id2label: dict) -> dict[int, int]:
    """Model label index -> CONTRADICTION / NEUTRAL / ENTAILMENT, from the label names (``entail*`` is
    entailment, ``contra*`` contradiction, anything else neutral, e.g. ``not_entailment``)."""
    codes = {}
    for i, name in id2label.items():
        n = str(name).lower()
        codes[int(i)] = ENTAILMENT if n.startswith("entail") else CONTRADICTION if n.startswith("contra") else NEUTRAL
    if ENTAILMENT not in codes.values():
        raise ValueError(f"the NLI model has no entailment label (id2label={id2label}); name one 'entailment'")
    return codes


class NLIJudge(_EntailmentJudge):
    """Bidirectional entailment with a sequence-classification NLI model (premise, hypothesis) -> label."""

    name = "nli"

    def __init__(self, model, tokenizer, *, with_question: bool = True, strict: bool = True, batch_size: int = 32,
                 max_length: int = 256):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.codes = nli_label_codes(model.config.id2label)
        self.with_question, self.strict = with_question, strict
        self.batch_size, self.max_length = batch_size, max_length

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, device: str = "cpu", **kwargs) -> NLIJudge:
        """Load from a local folder, or from the hub by name when online (e.g. ``microsoft/deberta-large-mnli``)."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(name_or_path)
            model = AutoModelForSequenceClassification.from_pretrained(name_or_path).to(device)
        except OSError as e:
            raise ModelUnavailableError(f"cannot load the NLI model {name_or_path!r}: {e}. Give a local folder "
                                        "(save_pretrained of a model and its tokenizer) or go online for a hub "
                                        "name; offline, use the 'exact-match' judge") from e
        return cls(model, tok, **kwargs)

    @torch.no_grad()
    def labels(self, question, premises, hypotheses) -> list[int]:
        if self.with_question:
            premises = [f"{question} {p}" for p in premises]
            hypotheses = [f"{question} {h}" for h in hypotheses]
        dev = next(self.model.parameters()).device
        out = []
        for s in range(0, len(premises), self.batch_size):
            enc = self.tokenizer(list(premises[s: s + self.batch_size]), list(hypotheses[s: s + self.batch_size]),
                                 padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            logits = self.model(**{k: v.to(dev) for k, v in enc.items()}).logits
            out += [self.codes[i] for i in logits.argmax(-1).tolist()]
        return out


LM_JUDGE_PROMPT = ("We are evaluating answers to the question {question}\nHere are two possible answers:\n"
                   "Possible Answer 1: {a}\nPossible Answer 2: {b}\n"
                   "Does Possible Answer 1 semantically entail Possible Answer 2? "
                   "Respond with entailment, contradiction, or neutral.")


class LMJudge(_EntailmentJudge):
    """The generating model as an entailment judge (first-token probabilities of the three label words, in
    lower case and capitalised, at the start of its reply)."""

    name = "lm"

    def __init__(self, engine, *, strict: bool = True, batch_size: int = 16, chat: bool = True,
                 prompt: str = LM_JUDGE_PROMPT):
        self.engine, self.strict, self.batch_size, self.chat, self.prompt = engine, strict, batch_size, chat, prompt
        tok = engine.tokenizer
        self.label_tokens: list[list[int]] = []
        for w in LABEL_WORDS:
            ids = {tok(v, add_special_tokens=False)["input_ids"][0] for v in (w, w.capitalize())}
            self.label_tokens.append(sorted(ids))
        flat = [t for ts in self.label_tokens for t in ts]
        if len(flat) != len(set(flat)):
            raise ValueError(f"the label words share first tokens {self.label_tokens}; the LM judge cannot tell "
                             "them apart with this tokenizer")

    def prompt_ids(self, question: str, a: str, b: str) -> list[int]:
        from workbench.chat import prompt_ids

        text = self.prompt.format(question=question, a=a, b=b)
        return prompt_ids(self.engine.tokenizer, [{"role": "user", "content": text}], chat=self.chat)

    def label_logprobs(self, question, premises, hypotheses) -> torch.Tensor:
        """``[n, 3]`` log-probabilities of (contradiction, neutral, entailment) renormalised over the three."""
        prompts = [self.prompt_ids(question, p, h) for p, h in zip(premises, hypotheses, strict=True)]
        rows = []
        with torch.inference_mode():
            for s in range(0, len(prompts), self.batch_size):
                logp = torch.log_softmax(self.engine.start(prompts[s: s + self.batch_size], 0).logits.float(), -1)
                rows.append(torch.stack([logp[:, ts].logsumexp(-1) for ts in self.label_tokens], -1))
        lp = torch.cat(rows)
        return lp - lp.logsumexp(-1, keepdim=True)

    def labels(self, question, premises, hypotheses) -> list[int]:
        return self.label_logprobs(question, premises, hypotheses).argmax(-1).tolist()


JUDGES = {"exact-match": ExactMatchJudge, "nli": NLIJudge.from_pretrained, "lm": LMJudge}


def make_judge(name: str, *args, **kwargs):
    """``make_judge("exact-match")``, ``make_judge("nli", "path/to/folder")``, ``make_judge("lm", engine)``."""
    if name not in JUDGES:
        raise UnknownNameError("judge", name, list(JUDGES))
    return JUDGES[name](*args, **kwargs)


# -- the detector ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SemanticEntropyConfig:
    """Sampling for semantic entropy: the paper's ``n_samples=10`` at temperature 1, with the top-k 50 that
    transformers' ``generate`` applies by default (the authors sampled with it)."""

    n_samples: int = 10
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    max_new_tokens: int = 16
    stop_strings: tuple[str, ...] = ("\n",)
    seed: int = 0
    batch_prompts: int = 4  # prompts prefilled together (n_samples rows each)

    def __post_init__(self):
        if self.n_samples < 2:
            raise ValueError(f"n_samples must be >= 2, got {self.n_samples}")
        if self.temperature <= 0:
            raise ValueError(f"semantic entropy samples at a temperature > 0, got {self.temperature}")
        if self.batch_prompts < 1:
            raise ValueError(f"batch_prompts must be >= 1, got {self.batch_prompts}")


@dataclass
class SemanticEntropyResult:
    samples: list[Sample]
    cluster_ids: list[int]
    entropy: float
    discrete_entropy: float
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"samples": [s.to_json() for s in self.samples], "cluster_ids": self.cluster_ids,
                "entropy": self.entropy, "discrete_entropy": self.discrete_entropy, **self.extra}


def analyse_samples(question: str, samples: Sequence[Sample], judge) -> SemanticEntropyResult:
    """Cluster the samples' answers and compute both entropies."""
    ids = cluster_answers(question, [s.answer for s in samples], judge)
    return SemanticEntropyResult(list(samples), ids, semantic_entropy([s.mean_logprob() for s in samples], ids),
                                 discrete_semantic_entropy(ids))


class SemanticEntropy:
    """``semantic-entropy`` / ``semantic-entropy-discrete``: samples with the generation's own prompt."""

    def __init__(self, engine, judge=None, config: SemanticEntropyConfig = SemanticEntropyConfig(), *,
                 discrete: bool = False):
        self.engine, self.config, self.discrete = engine, config, discrete
        self.judge = judge if judge is not None else ExactMatchJudge()
        self.name = "semantic-entropy-discrete" if discrete else "semantic-entropy"

    def sample(self, prompts: Sequence[Sequence[int]]) -> list[list[Sample]]:
        c = self.config
        from workbench.engine.config import SamplingParams

        sp = SamplingParams(temperature=c.temperature, top_k=c.top_k, top_p=c.top_p)
        out = []
        for s in range(0, len(prompts), c.batch_prompts):
            out += sample_answers(self.engine, prompts[s: s + c.batch_prompts], c.n_samples, sp,
                                  max_new_tokens=c.max_new_tokens, stop_strings=c.stop_strings, seed=c.seed)
            log.info("sampled %d / %d prompts", len(out), len(prompts))
        return out

    def analyse(self, generations) -> list[SemanticEntropyResult]:
        samples = self.sample([g.prompt_ids for g in generations])
        return [analyse_samples(g.question, s, self.judge) for g, s in zip(generations, samples, strict=True)]

    def score(self, generations) -> np.ndarray:
        res = self.analyse(generations)
        return np.array([r.discrete_entropy if self.discrete else r.entropy for r in res], dtype=float)
