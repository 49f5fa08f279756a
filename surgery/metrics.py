"""Knowledge-editing metrics: EasyEdit's token accuracies and ROME/MEMIT's probability comparisons, side by side.

Two families are in use in the literature and they are easy to confuse (EasyEdit issue #125): a paper's
"efficacy 99%" may be either. Both are computed here from the same forward passes and kept under separate
names (``EditMetrics.to_dict()`` nests them under ``"easyedit"``, ``"rome"`` and ``"greedy"``).

**EasyEdit** (teacher-forced token accuracy). The prompt followed by the gold answer is fed to the model; for
each answer token, is it the argmax given the gold prefix? The score of one prompt is the fraction of answer
tokens that are.

- ``rewrite_acc``: token accuracy of ``target_new`` on the edit prompt;
- ``rephrase_acc``: the same on the paraphrase prompts (mean over prompts);
- ``locality``: for each locality prompt and its answer, the fraction of answer positions whose argmax is the
  same as the *pre-edit* model's argmax (so it needs a ``reference``: the pre-edit metrics or predictions);
  1.0 means nothing changed. It does not look at whether the argmax was right before the edit;
- ``portability``: token accuracy of the portability answers.

**ROME / MEMIT** (probability comparisons, Meng et al. 2022, 2023). ``P(x)`` is the probability of the whole
target sequence after the prompt, ``exp(sum log p(token | prefix))`` (``prob="sequence"``, the default), or
ROME's code's per-token geometric mean ``exp(mean log p)`` (``prob="per_token"``).

- ``efficacy_score``: ``P(target_new) > P(target_true)`` on the edit prompt (1 or 0 per request);
- ``paraphrase_score``: the fraction of paraphrase prompts with ``P(new) > P(true)``;
- ``neighborhood_score``: the fraction of locality (neighborhood) prompts with ``P(true) > P(new)``, where
  ``true``/``new`` are the request's targets (CounterFact's neighbours share the edited fact's true answer);
- ``*_magnitude``: the mean of ``P(new) - P(true)`` (efficacy, paraphrase) or ``P(true) - P(new)``
  (neighborhood);
- ``fluency``: ROME's generation entropy, the weighted mean ``(2/3 H_2 + 4/3 H_3) / 2`` of the bigram and
  trigram entropies (bits) of a free generation from the edit prompt (only with ``fluency=True``). Words are
  split with ``\\w+|[^\\w\\s]`` instead of NLTK's tokenizer (which needs a data download); low values mean
  repetitive text.

**Greedy** (what a user sees): the greedy continuation starts with the answer, i.e. every answer token is the
argmax given the previous answer tokens (equivalent to a token accuracy of exactly 1). ``rewrite_greedy``
(edit prompt produces ``target_new``), ``rephrase_greedy`` (fraction of paraphrases), ``neighborhood_greedy``
(fraction of locality prompts that still produce their own ground-truth answer), ``portability_greedy``.

Aggregates are means over requests of the per-request values (``None`` values left out), as in ROME's
``summarize.py`` and EasyEdit's summary.

Targets are tokenised as continuations of their prompt with :func:`workbench.surgery.requests.target_ids`, the
rule the editing methods use.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from workbench.surgery.requests import EditRequest, as_requests, prompt_ids, target_ids

log = logging.getLogger(__name__)

EASYEDIT_KEYS = ("rewrite_acc", "rephrase_acc", "locality", "portability")
ROME_KEYS = ("efficacy_score", "efficacy_magnitude", "paraphrase_score", "paraphrase_magnitude",
             "neighborhood_score", "neighborhood_magnitude", "fluency")
GREEDY_KEYS = ("rewrite_greedy", "rephrase_greedy", "neighborhood_greedy", "portability_greedy")
FAMILIES = {"easyedit": EASYEDIT_KEYS, "rome": ROME_KEYS, "greedy": GREEDY_KEYS}


# --- one (prompt, answer) pair --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairScore:
    """The model's view of ``answer`` as a continuation of ``prompt`` (teacher-forced, one forward pass)."""

    prompt: str
    answer: str
    target: tuple[int, ...]  # answer token ids
    argmax: tuple[int, ...]  # argmax at each answer position, given the gold prefix
    logprobs: tuple[float, ...]  # log p(answer token | prompt + gold prefix)

    @property
    def n(self) -> int:
        return len(self.target)

    @property
    def token_acc(self) -> float:
        """EasyEdit's accuracy: the fraction of answer tokens that are the argmax."""
        return sum(a == t for a, t in zip(self.argmax, self.target, strict=True)) / self.n

    @property
    def exact(self) -> bool:
        """Greedy decoding from ``prompt`` starts with ``answer``'s tokens."""
        return self.argmax == self.target

    @property
    def logp(self) -> float:
        return sum(self.logprobs)

    def prob(self, kind: str = "sequence") -> float:
        if kind == "sequence":
            return math.exp(self.logp)
        if kind == "per_token":
            return math.exp(self.logp / self.n)
        raise ValueError(f"prob must be 'sequence' or 'per_token', got {kind!r}")


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def score_pairs(model, tokenizer, pairs: Iterable[tuple[str, str]], *, batch_size: int = 32) -> list[PairScore]:
    """Teacher-forced scores of ``(prompt, answer)`` pairs, batched with right padding (positions unchanged)."""
    pairs = list(pairs)
    encoded = []
    for prompt, answer in pairs:
        p, t = prompt_ids(tokenizer, prompt), target_ids(tokenizer, prompt, answer)
        if not p or not t:
            raise ValueError(f"prompt {prompt!r} or answer {answer!r} tokenizes to nothing")
        encoded.append((p, t))
    order = sorted(range(len(pairs)), key=lambda i: len(encoded[i][0]) + len(encoded[i][1]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    dev = _device(model)
    out: list[PairScore | None] = [None] * len(pairs)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        seqs = [encoded[i][0] + encoded[i][1] for i in idx]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, :len(s)] = torch.tensor(s)
            mask[r, :len(s)] = 1
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        for r, i in enumerate(idx):
            p, t = encoded[i]
            pos = torch.arange(len(p) - 1, len(p) + len(t) - 1, device=dev)
            tgt = torch.tensor(t, device=dev)
            row = logp[r, pos]
            out[i] = PairScore(pairs[i][0], pairs[i][1], tuple(t), tuple(row.argmax(-1).tolist()),
                               tuple(row.gather(-1, tgt[:, None])[:, 0].tolist()))
    return out  # type: ignore[return-value]


# --- fluency ---------------------------------------------------------------------------------------------------

_WORD = re.compile(r"\w+|[^\w\s]")


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's ``compute_n_gram_entropy``: mean over n of ``weight_n * H(n-gram frequencies)`` in bits."""
    words = _WORD.findall(text)
    ents = []
    for n, w in zip(ns, weights, strict=True):
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        ents.append(w * h)
    return sum(ents) / len(ents)


@torch.inference_mode()
def generate_texts(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 64, greedy: bool = False,
                   top_k: int = 5, seed: int = 0) -> list[str]:
    """Free generations (continuations only) from each prompt: greedy, or top-k sampling with a fixed seed."""
    texts = []
    dev = _device(model)
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([prompt_ids(tokenizer, prompt)], device=dev)
        kw = {"do_sample": False} if greedy else {"do_sample": True, "top_k": top_k, "top_p": 1.0,
                                                    "temperature": 1.0}
        with torch.random.fork_rng(devices=[] if dev.type == "cpu" else [dev]):
            torch.manual_seed(seed + i)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                 else tokenizer.eos_token_id, **kw)
        texts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return texts


# --- per request and aggregate ---------------------------------------------------------------------------------


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


@dataclass
class RequestMetrics:
    case_id: str | int | None
    text: str
    target_new: str
    target_true: str | None
    # EasyEdit family: teacher-forced token accuracy
    rewrite_acc: float
    rephrase_acc: float | None = None
    locality: float | None = None  # vs the reference (pre-edit) argmax; None without a reference
    portability: float | None = None
    # ROME/MEMIT family: probability comparisons (need target_true)
    efficacy_score: float | None = None
    efficacy_magnitude: float | None = None
    paraphrase_score: float | None = None
    paraphrase_magnitude: float | None = None
    neighborhood_score: float | None = None
    neighborhood_magnitude: float | None = None
    fluency: float | None = None
    # greedy answer == target
    rewrite_greedy: float = 0.0
    rephrase_greedy: float | None = None
    neighborhood_greedy: float | None = None
    portability_greedy: float | None = None
    # raw material
    p_new: float | None = None  # P(target_new | edit prompt)
    p_true: float | None = None
    generation: str | None = None
    locality_pairs: list[tuple[str, str]] = field(default_factory=list)
    locality_argmax: list[list[int]] = field(default_factory=list)  # per locality pair: argmax ids (for reference)

    def family(self, name: str) -> dict:
        return {k: getattr(self, k) for k in FAMILIES[name]}


@dataclass
class EditMetrics:
    requests: list[RequestMetrics]
    prob: str = "sequence"
    has_reference: bool = False

    def aggregate(self) -> dict:
        return {fam: {k: _mean(getattr(r, k) for r in self.requests) for k in keys} for fam, keys in FAMILIES.items()}

    def __getitem__(self, key: str) -> float | None:
        """An aggregated metric by name (``m["efficacy_score"]``)."""
        for fam, keys in FAMILIES.items():
            if key in keys:
                return self.aggregate()[fam][key]
        raise KeyError(f"unknown metric {key!r}; known: {[k for ks in FAMILIES.values() for k in ks]}")

    def reference(self) -> dict[tuple[str, str], list[int]]:
        """Locality predictions keyed by ``(prompt, answer)``: pass as ``reference=`` to a later evaluation."""
        return {key: ids for r in self.requests for key, ids in zip(r.locality_pairs, r.locality_argmax, strict=True)}

    def to_dict(self) -> dict:
        per = []
        for r in self.requests:
            d = {k: v for k, v in asdict(r).items() if k not in (*EASYEDIT_KEYS, *ROME_KEYS, *GREEDY_KEYS)}
            d.pop("locality_argmax")
            d.pop("locality_pairs")
            per.append({**d, **{fam: r.family(fam) for fam in FAMILIES}})
        return {"n_requests": len(self.requests), "prob": self.prob, "has_reference": self.has_reference,
                **self.aggregate(), "per_request": per}

    def table(self, per_request: bool = False) -> str:
        agg = self.aggregate()
        lines = [f"{'family':<10}{'metric':<24}{'value':>10}", "-" * 44]
        for fam, keys in FAMILIES.items():
            for k in keys:
                v = agg[fam][k]
                lines.append(f"{fam:<10}{k:<24}{'-' if v is None else f'{v:.3f}':>10}")
        lines.append(f"({len(self.requests)} requests; P = {self.prob} probability; locality "
                     f"{'vs reference argmax' if self.has_reference else 'needs a reference'})")
        if per_request:
            cols = ("rewrite_acc", "efficacy_score", "rewrite_greedy", "rephrase_greedy", "neighborhood_greedy")
            lines += ["", f"{'case':<10}{'prompt':<44}" + "".join(f"{c[:12]:>13}" for c in cols)]
            for r in self.requests:
                vals = "".join(f"{'-' if getattr(r, c) is None else f'{getattr(r, c):.2f}':>13}" for c in cols)
                lines.append(f"{str(r.case_id)[:9]:<10}{(r.text + ' -> ' + r.target_new)[:43]:<44}{vals}")
        return "\n".join(lines)


def reference_predictions(model, tokenizer, requests, *, batch_size: int = 32) -> dict[tuple[str, str], list[int]]:
    """Only the locality argmax of ``requests`` (what ``reference=`` needs), cheaper than a full evaluation."""
    pairs = sorted({tuple(p) for r in as_requests(requests) for p in r.locality})
    return {(s.prompt, s.answer): list(s.argmax) for s in score_pairs(model, tokenizer, pairs, batch_size=batch_size)}


def evaluate_requests(model, tokenizer, requests, *, reference=None, fluency: bool = False,
                      generation_tokens: int = 64, greedy_generation: bool = False, prob: str = "sequence",
                      batch_size: int = 32, seed: int = 0) -> EditMetrics:
    """Both metric families for each request on the model as it is now.

    ``reference``: the pre-edit model's locality predictions, as an :class:`EditMetrics` from evaluating the
    unedited model on (a superset of) the same requests, or the dict of :func:`reference_predictions`. Without
    it ``locality`` is ``None`` (the other metrics do not need it).
    ``fluency=True`` adds ROME's generation entropy of a free generation of ``generation_tokens`` tokens from
    each edit prompt (top-5 sampling with ``seed``, or greedy with ``greedy_generation=True``).
    """
    reqs: list[EditRequest] = as_requests(requests)
    if isinstance(reference, EditMetrics):
        reference = reference.reference()
    if prob not in ("sequence", "per_token"):
        raise ValueError(f"prob must be 'sequence' or 'per_token', got {prob!r}")
    wanted: set[tuple[str, str]] = set()
    for r in reqs:
        text = r.text
        targets = [r.target_new] + ([r.target_true] if r.target_true is not None else [])
        for p in (text, *r.rephrase_prompts):
            wanted.update((p, t) for t in targets)
        for p, a in r.locality:
            wanted.add((p, a))
            wanted.update((p, t) for t in targets)
        wanted.update(tuple(p) for p in r.portability)
    keys = sorted(wanted)
    scores = dict(zip(keys, score_pairs(model, tokenizer, keys, batch_size=batch_size), strict=True))
    texts = (generate_texts(model, tokenizer, [r.text for r in reqs], max_new_tokens=generation_tokens,
                            greedy=greedy_generation, seed=seed) if fluency else [None] * len(reqs))

    def pr(p, t):
        return scores[(p, t)].prob(prob)

    out = []
    for r, gen in zip(reqs, texts, strict=True):
        text, new, true = r.text, r.target_new, r.target_true
        m = RequestMetrics(r.case_id, text, new, true, rewrite_acc=scores[(text, new)].token_acc,
                           rewrite_greedy=float(scores[(text, new)].exact))
        m.p_new = pr(text, new)
        reph = r.rephrase_prompts
        if reph:
            m.rephrase_acc = _mean(scores[(p, new)].token_acc for p in reph)
            m.rephrase_greedy = _mean(float(scores[(p, new)].exact) for p in reph)
        if r.locality:
            locs = [tuple(p) for p in r.locality]
            m.locality_pairs = locs
            m.locality_argmax = [list(scores[k].argmax) for k in locs]
            m.neighborhood_greedy = _mean(float(scores[k].exact) for k in locs)
            if reference is not None:
                missing = [k for k in locs if k not in reference]
                if missing:
                    raise KeyError(f"reference lacks locality pairs {missing[:3]} of {r.label()}: evaluate the "
                                   "unedited model on the same requests")
                m.locality = _mean(
                    sum(a == b for a, b in zip(scores[k].argmax, reference[k], strict=True)) / scores[k].n
                    for k in locs)
        if r.portability:
            ports = [tuple(p) for p in r.portability]
            m.portability = _mean(scores[k].token_acc for k in ports)
            m.portability_greedy = _mean(float(scores[k].exact) for k in ports)
        if true is not None:
            m.p_true = pr(text, true)
            m.efficacy_score = float(m.p_new > m.p_true)
            m.efficacy_magnitude = m.p_new - m.p_true
            if reph:
                m.paraphrase_score = _mean(float(pr(p, new) > pr(p, true)) for p in reph)
                m.paraphrase_magnitude = _mean(pr(p, new) - pr(p, true) for p in reph)
            if r.locality:
                m.neighborhood_score = _mean(float(pr(p, true) > pr(p, new)) for p, _ in r.locality)
                m.neighborhood_magnitude = _mean(pr(p, true) - pr(p, new) for p, _ in r.locality)
        if gen is not None:
            m.generation = gen
            m.fluency = ngram_entropy(gen)
        out.append(m)
    return EditMetrics(out, prob=prob, has_reference=reference is not None)
