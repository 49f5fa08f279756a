"""Speculative decoding: a proposer drafts tokens, the target model verifies them all in one forward.

Verification is exact (Leviathan et al. 2023; Chen et al. 2023; :mod:`workbench.kernels.spec_verify`): the
output is distributed as sampling from the target alone, and greedy output equals plain greedy decoding.
Proposers are looked up by exact name in :data:`PROPOSERS`: ``prompt-lookup`` (copy the continuation of the
latest earlier occurrence of the last n-gram; point-mass drafts, no extra model) and ``draft-model`` (a smaller
model with the same tokenizer, sampled with the same processors). Draft length adapts per request: +2 after a
fully accepted block, -1 otherwise, so input-grounded text gets long drafts and open-ended text short ones.

Batches are ragged: every verification step appends ``1 + max drafts`` slots to the KV cache
(:meth:`Session.step <workbench.engine.step.Session.step>`); each request's rejected drafts are rolled back
(:meth:`Session.rollback <workbench.engine.step.Session.rollback>`: masked slots, positions reused), so requests
accept different numbers of tokens without re-running anything.

The draft model for ``draft-model`` comes in the config: an ``Engine``, a ``(model, tokenizer)`` pair, or a name
given to :func:`register_draft`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from workbench.engine import processors
from workbench.engine.config import GREEDY, SamplingParams, check_logprobs
from workbench.engine.results import GenerationResult, token_logprobs
from workbench.errors import UnknownNameError

DRAFTS: dict[str, Any] = {}  # name -> Engine or (model, tokenizer), for SpeculativeConfig(draft="name")


def register_draft(name: str, draft, *, replace: bool = False) -> None:
    """Make ``draft`` (an Engine or a ``(model, tokenizer)`` pair) usable as ``SpeculativeConfig(draft=name)``."""
    if not name or not isinstance(name, str):
        raise ValueError("draft name must be a non-empty string")
    if name in DRAFTS and not replace:
        raise ValueError(f"draft {name!r} is already registered (pass replace=True to override)")
    DRAFTS[name] = draft


@dataclass(frozen=True)
class SpeculativeConfig:
    max_new_tokens: int = 128
    sampling: SamplingParams = GREEDY
    proposer: str = "prompt-lookup"
    num_draft: int = 4  # initial draft length
    max_draft: int = 8
    adaptive: bool = True
    ngram_min: int = 2  # prompt lookup: shortest n-gram to match (1-grams draft too much junk in open text)
    ngram_max: int = 3
    eos_token_ids: tuple[int, ...] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()
    logprobs: int | None = None  # as GenerationConfig.logprobs, under the target's processed distribution
    draft: Any = None  # proposer 'draft-model': an Engine, a (model, tokenizer) pair or a registered name

    def __post_init__(self):
        s = self.sampling
        check_logprobs(self.logprobs)
        if isinstance(self.stop_strings, str) or any(not x for x in self.stop_strings):
            raise ValueError("stop_strings must be a tuple of non-empty strings")
        if isinstance(self.draft, str) and self.draft not in DRAFTS:
            raise UnknownNameError("draft model", self.draft, list(DRAFTS))
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (1 <= self.num_draft <= self.max_draft, f"need 1 <= num_draft <= max_draft, got {self.num_draft}, "
                                                    f"{self.max_draft}"),
            (1 <= self.ngram_min <= self.ngram_max, "need 1 <= ngram_min <= ngram_max"),
            (isinstance(s, SamplingParams), "sampling must be a SamplingParams"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if s.repetition_penalty != 1.0 or s.frequency_penalty or s.presence_penalty:
            raise ValueError("speculative decoding does not support repetition/frequency/presence penalties "
                             "(they change within a verified block); use strategy 'sample'")
        if self.proposer not in PROPOSERS:
            raise UnknownNameError("proposer", self.proposer, list(PROPOSERS))


@dataclass
class SpeculativeStats:
    """``GenerationResult.stats`` of speculative decoding."""

    steps: int = 0  # target forwards after the prefill
    proposed: int = 0
    accepted: int = 0
    tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / max(1, self.steps)


def _no_history(logits: torch.Tensor):
    """Empty seen/counts tables for :func:`processors.process` (penalties are refused in this mode)."""
    none = torch.zeros((1, 1), dtype=torch.bool, device=logits.device).expand(
        logits.numel() // logits.shape[-1], logits.shape[-1])
    return none, none.int()


def _per_position(params: Sequence[SamplingParams], T: int) -> list[SamplingParams]:
    """Each request's params repeated for its T positions, matching ``logits.reshape(B * T, V)``."""
    return [p for p in params for _ in range(T)]


def _probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Processed target/draft distributions ``[B, T, V]`` (one-hot argmax for greedy rows)."""
    B, T, V = logits.shape
    flat = logits.reshape(B * T, V).float()
    rep = _per_position(params, T)
    x = processors.process(flat, rep, *_no_history(flat))
    probs = torch.softmax(x, -1)
    greedy = torch.tensor([p.greedy for p in rep], device=logits.device)
    if greedy.any():
        one_hot = torch.nn.functional.one_hot(x.argmax(-1), V).float()
        probs = torch.where(greedy[:, None], one_hot, probs)
    return probs.view(B, T, V)


def _draw(probs: torch.Tensor, gens) -> list[int]:
    """One token per row of ``probs [B, V]`` with each row's generator (inverse CDF)."""
    out = []
    for b, g in enumerate(gens):
        u = torch.rand((), generator=g, device=probs.device)
        c = probs[b].cumsum(0)
        idx = int(torch.searchsorted(c, u * c[-1], right=True).clamp(max=probs.shape[1] - 1))
        while probs[b, idx] == 0:  # rounding landed on a zero-probability token: step back
            idx -= 1
        out.append(idx)
    return out


# -- proposers ---------------------------------------------------------------------------------------------


class PromptLookup:
    """Drafts by n-gram lookup in the request's own prompt and output (Saxena 2023, "prompt lookup decoding")."""

    point_mass = True

    def __init__(self, cfg: SpeculativeConfig, **_):
        self.cfg = cfg

    def start(self, engine, contexts, params, gens, extra):
        self.ctx = [list(c) for c in contexts]

    def propose(self, ks: Sequence[int]):
        out = []
        for ctx, k in zip(self.ctx, ks, strict=True):
            out.append(self._lookup(ctx, k) if k > 0 else [])
        return out, None

    def _lookup(self, ctx: list[int], k: int) -> list[int]:
        for n in range(min(self.cfg.ngram_max, len(ctx) - 1), self.cfg.ngram_min - 1, -1):
            tail = ctx[-n:]
            for i in range(len(ctx) - n - 1, -1, -1):  # latest earlier occurrence first
                if ctx[i: i + n] == tail:
                    return ctx[i + n: i + n + k]
        return []

    def commit(self, row: int, accepted: list[int], drafts: list[int], new: int):
        self.ctx[row].extend(accepted + [new])


class DraftModel:
    """Drafts with a smaller model sharing the tokenizer; its KV cache follows the target's acceptances."""

    point_mass = False

    def __init__(self, cfg: SpeculativeConfig, **_):
        draft = DRAFTS[cfg.draft] if isinstance(cfg.draft, str) else cfg.draft
        if draft is None:
            raise ValueError("proposer 'draft-model' needs SpeculativeConfig(draft=<Engine, (model, tokenizer) or "
                             "a name from register_draft>)")
        self.cfg = cfg
        self.draft = draft

    def start(self, engine, contexts, params, gens, extra):
        d = self.draft if isinstance(self.draft, type(engine)) else engine.sibling(*self.draft)
        if d.vocab_size != engine.vocab_size:
            raise ValueError(f"draft vocab {d.vocab_size} != target vocab {engine.vocab_size}: the draft model "
                             "must share the target's tokenizer")
        self.params, self.gens = params, gens
        self.seq = d.start([c[:-1] for c in contexts], extra)
        self.unseen = [[c[-1]] for c in contexts]

    def propose(self, ks: Sequence[int]):
        """Draft ``max(ks)`` tokens for every row (the loop trims each row to its own k)."""
        k = max(ks)
        self.k_round, self.round_unseen = k, [len(u) for u in self.unseen]
        drafts: list[list[int]] = [[] for _ in ks]
        if k == 0:
            return drafts, None
        feed, qs = self.unseen, []
        for step in range(k):
            logits = self.seq.step(feed)
            last = torch.tensor([max(0, len(f) - 1) for f in feed], device=logits.device)
            q = _probs(logits[torch.arange(len(feed)), last][:, None], self.params)[:, 0]
            toks = _draw(q, self.gens)
            qs.append(q)
            for b, t in enumerate(toks):
                drafts[b].append(t)
            if step < k - 1:
                feed = [[t] for t in toks]
        self.round_drafts = drafts
        return drafts, torch.stack(qs, 1)

    def commit(self, row: int, accepted: list[int], drafts: list[int], new: int):
        if self.k_round == 0:
            self.unseen[row] = self.unseen[row] + [new]
            return
        # fed this round: the unseen tokens, then drafts 1..k-1 (draft k was sampled, never fed)
        n = len(accepted)
        fed = self.round_unseen[row] + self.k_round - 1
        self.seq.rollback(row, fed - (self.round_unseen[row] + min(n, self.k_round - 1)))
        self.unseen[row] = ([self.round_drafts[row][-1]] if n == self.k_round else []) + [new]


PROPOSERS = {"prompt-lookup": PromptLookup, "draft-model": DraftModel}


def register_proposer(name: str, cls, *, replace: bool = False) -> None:
    """Add a proposer class: ``cls(cfg)`` with ``point_mass``, ``start(engine, contexts, params, gens,
    extra)``, ``propose(ks) -> (drafts, q [B, k, V] or None)`` and ``commit(row, accepted, drafts, new)``."""
    if name in PROPOSERS and not replace:
        raise ValueError(f"proposer {name!r} is already registered")
    for method in ("start", "propose", "commit"):
        if not callable(getattr(cls, method, None)):
            raise TypeError(f"a proposer needs a {method}() method")
    PROPOSERS[name] = cls


# -- the loop -------------------------------------------------------------------------------------------------


@torch.inference_mode()
def speculative_generate(engine, prompts, cfg: SpeculativeConfig) -> list[GenerationResult]:
    from workbench.kernels.spec_verify import verify

    if not isinstance(cfg, SpeculativeConfig):
        raise TypeError(f"speculative decoding takes a SpeculativeConfig, got {type(cfg).__name__}")
    ids = engine.encode_all(prompts)
    B, dev = len(ids), engine.device
    gens = [engine.generator(cfg.seed) for _ in range(B)]
    params = [cfg.sampling] * B
    stops = [engine.stopper(p, cfg.max_new_tokens, eos_token_ids=cfg.eos_token_ids, ignore_eos=cfg.ignore_eos,
                            stop_strings=cfg.stop_strings, logprobs=cfg.logprobs) for p in ids]
    results = [st.result for st in stops]
    stats = [SpeculativeStats() for _ in range(B)]
    for r, st in zip(results, stats, strict=True):
        r.stats = st
    extra = cfg.max_new_tokens * (cfg.max_draft + 1) + 1
    target = engine.start(ids, extra)
    if target.rollback_refusal:
        raise ValueError(f"speculative decoding rolls back rejected drafts, which this model's cache cannot: "
                         f"{target.rollback_refusal}; use strategy 'sample'")
    first = target.logits[:, None]
    p0 = _probs(first, params)
    pending = _draw(p0[:, 0], gens)

    def emit(b: int, toks: list[int], lp_rows: torch.Tensor | None) -> None:
        """``lp_rows [>= len(toks), V]``: log-probabilities at the positions where ``toks`` were chosen."""
        lps = ([None] * len(toks) if lp_rows is None
               else token_logprobs(lp_rows[: len(toks)], toks, [cfg.logprobs] * len(toks)))
        for tok, lp in zip(toks, lps, strict=True):
            if stops[b].done:
                return
            stops[b].push(tok, lp)

    first_lp = _logp(first, params) if cfg.logprobs is not None else None
    for b in range(B):
        emit(b, [pending[b]], None if first_lp is None else first_lp[b])  # [1, V]
    proposer = PROPOSERS[cfg.proposer](cfg)
    proposer.start(engine, [p + [t] for p, t in zip(ids, pending, strict=True)], params, gens, extra)
    K = [cfg.num_draft] * B
    with target.decoding():
        while not all(st.done for st in stops):
            done = [st.done for st in stops]
            ks = [0 if done[b] else min(K[b], cfg.max_new_tokens - len(results[b].token_ids) - 1)
                  for b in range(B)]
            drafts, q = proposer.propose(ks)
            drafts = [d[:k] for d, k in zip(drafts, ks, strict=True)]
            kmax = max(len(d) for d in drafts)
            feed = [[] if done[b] else [pending[b]] + drafts[b] for b in range(B)]
            logits = target.step(feed)  # [B, kmax + 1, V]
            lp_all = _logp(logits, params) if cfg.logprobs is not None else None
            if all(p.greedy for p in params):
                # greedy fast path (same result as the verifier with one-hot p): accept the drafts that equal
                # the argmax, then take the argmax after the last accepted one
                flat = logits.reshape(-1, logits.shape[-1])  # row-major: request b's positions are adjacent
                best = processors.process(flat, _per_position(params, kmax + 1), *_no_history(flat)).argmax(-1)
                best = best.view(B, kmax + 1).tolist()
                n_acc = []
                for b in range(B):
                    n = 0
                    while n < len(drafts[b]) and drafts[b][n] == best[b][n]:
                        n += 1
                    n_acc.append(n)
                new = [best[b][n_acc[b]] for b in range(B)]
            elif kmax == 0:
                p = _probs(logits, params)
                new = _draw(p[:, 0], gens)
                n_acc = [0] * B
            else:
                p = _probs(logits, params)
                d_t = torch.zeros((B, kmax), dtype=torch.long, device=dev)
                u_acc = torch.ones((B, kmax), device=dev)  # 1.0 never accepts: pads are always rejected
                for b in range(B):
                    if drafts[b]:
                        d_t[b, : len(drafts[b])] = torch.tensor(drafts[b], device=dev)
                        u_acc[b, : len(drafts[b])] = torch.rand(len(drafts[b]), generator=gens[b], device=dev)
                u_smp = torch.stack([torch.rand((), generator=g, device=dev) for g in gens])
                qq = None
                if q is not None:
                    qq = torch.nn.functional.one_hot(d_t, p.shape[-1]).float()  # pads: point mass on the pad
                    for b in range(B):
                        qq[b, : len(drafts[b])] = q[b, : len(drafts[b])]
                n_t, toks = verify(d_t, qq, p.contiguous(), u_acc, u_smp)
                n_acc = n_t.tolist()
                new = [int(toks[b, n_acc[b]]) for b in range(B)]
            for b in range(B):
                if done[b]:
                    continue
                st = stats[b]
                st.steps += 1
                st.proposed += len(drafts[b])
                st.accepted += n_acc[b]
                emit(b, drafts[b][: n_acc[b]] + [new[b]], None if lp_all is None else lp_all[b])
                target.rollback(b, len(feed[b]) - (1 + n_acc[b]))
                proposer.commit(b, drafts[b][: n_acc[b]], drafts[b], new[b])
                pending[b] = new[b]
                if cfg.adaptive and drafts[b]:
                    K[b] = min(cfg.max_draft, K[b] + 2) if n_acc[b] == len(drafts[b]) else max(1, K[b] - 1)
    for r, st in zip(results, stats, strict=True):
        st.tokens = len(r.token_ids)
    return results


def _logp(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """``log_softmax`` of the processed logits ``[B, T, V]`` (the distribution each token is drawn from)."""
    B, T, V = logits.shape
    flat = logits.reshape(B * T, V).float()
    x = processors.process(flat, _per_position(params, T), *_no_history(flat))
    return torch.log_softmax(x, -1).view(B, T, V)
