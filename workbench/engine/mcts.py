"""Monte Carlo tree search over tokens (or token chunks) with a pluggable reward.

PUCT selection as in AlphaZero (Silver et al. 2017): ``Q(child) + c_puct * P(child) * sqrt(N(parent)) /
(1 + N(child))``, priors ``P`` from the LM (temperature, top ``expansion_width`` tokens renormalised), unvisited
children valued at their parent's mean (first-play urgency). Progressive widening (Coulom 2007; Chaslot et al.
2008) optionally lets a node with ``N`` visits choose among only its ``ceil(widening_k * (N + 1) ** widening)``
most probable children, so a small budget goes deep along likely tokens before it goes wide.

A leaf is expanded with one LM call (plus ``chunk - 1`` greedy calls per child when edges are chunks) and valued
by a rollout: greedy or sampled (seeded), to the end or for at
most ``rollout_tokens`` tokens. A rollout that ends is scored by the reward; one cut short is valued by its
likelihood, ``exp(mean log-probability)`` of the tokens it generated (a cheap value estimate in [0, 1], the
reward's range for the built-in rewards). Values are backed up as running means. Every complete sequence is
scored once (rewards are cached by sequence), so each simulation that ends somewhere new adds a candidate.
The answer is the best-rewarded complete sequence seen (``select="best"``, for verifier rewards), or the
best complete sequence inside the most visited subtree (``select="visits"``).

The budget is a hard cap: ``budget_tokens`` bounds ``forward_tokens``, the tokens the LM is run on, the
prompt's first prefill included. An LM call that would pass it is not run; the search stops there, and the
answer is chosen among what was already scored (no tokens are spent after the search). ``MCTSStats.trace``
lists each new candidate with the forward tokens spent when it was scored. With a deterministic LM and reward
the search is deterministic (rollouts are seeded), and a capped run is the same run cut at the first call that
would pass its cap: its trace, and so its ``select="best"`` answer and reward, can be read from one longer run
(``select="visits"`` depends on visit counts, which the trace does not hold).

The reward is any callable ``(text, token_ids) -> float`` (ready-made ones, with their sandbox, are in
:mod:`workbench.rewards`). The LM side reuses KV prefixes across tree nodes: one session holds the last
evaluated sequence, and the next request only runs the tokens after the longest common prefix (the session is
truncated to it, on every backend). ``reused_tokens`` reports what that saved.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from workbench.engine.results import GenerationResult

Reward = Callable[[str, list[int]], float]  # e.g. workbench.rewards.ExactAnswer / UnitTests

ROLLOUTS = ("greedy", "sample")
SELECTS = ("visits", "best")


class BudgetExhausted(RuntimeError):
    """An LM call would pass ``budget_tokens``; it was not run."""


# -- the LM side ---------------------------------------------------------------------------------------------


class EngineLM:
    """Next-token log-probabilities for arbitrary sequences through the engine's step API, reusing the KV cache's
    longest common prefix (on every backend: the session is truncated to it and only the rest runs).

    ``budget_tokens`` caps ``forward_tokens``: a call that would pass it raises :class:`BudgetExhausted` before
    running anything."""

    def __init__(self, engine, max_len: int, request: int = 0, n_requests: int = 1,
                 budget_tokens: int | None = None, eos: frozenset[int] | None = None):
        self.engine = engine
        self.max_len = max_len
        self.request, self.n_requests = request, n_requests  # for per-request offsets
        self.budget_tokens = budget_tokens
        self.session = None
        self.seq: list[int] = []
        self.logits = None
        self.forward_tokens = 0
        self.reused_tokens = 0
        self.vocab_size = engine.vocab_size
        self.eos = engine.default_eos() if eos is None else frozenset(eos)

    def _charge(self, n: int) -> None:
        if self.budget_tokens is not None and self.forward_tokens + n > self.budget_tokens:
            raise BudgetExhausted(f"{n} more forward tokens would pass budget_tokens={self.budget_tokens} "
                                  f"({self.forward_tokens} spent)")
        self.forward_tokens += n

    @torch.inference_mode()
    def next_logprobs(self, tokens: Sequence[int]) -> torch.Tensor:
        tokens = list(tokens)
        if len(tokens) > self.max_len:
            raise ValueError(f"sequence of {len(tokens)} tokens exceeds max_len {self.max_len}")
        if tokens == self.seq and self.logits is not None:
            self.reused_tokens += len(tokens)
            return self.logits
        lcp = 0
        for a, b in zip(self.seq, tokens, strict=False):
            if a != b:
                break
            lcp += 1
        lcp = min(lcp, len(tokens) - 1)  # at least one token must run to produce logits
        if self.session is None or lcp == 0 or self.session.rollback_refusal:
            self._charge(len(tokens))
            self.session = self.engine.start([tokens], self.max_len - len(tokens), requests=[self.request],
                                             n_requests=self.n_requests)
            logits, lcp = self.session.logits[0], 0
        else:
            self._charge(len(tokens) - lcp)
            self.session.truncate(lcp)  # slots past the common prefix are overwritten
            logits = self.session.step([tokens[lcp:]])[0, -1]
        self.reused_tokens += lcp
        self.seq, self.logits = tokens, torch.log_softmax(logits.float(), -1)
        return self.logits


# -- search --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MCTSConfig:
    reward: Reward | None = None
    simulations: int = 32
    c_puct: float = 1.5
    expansion_width: int = 8
    temperature: float = 1.0  # for the priors
    chunk: int = 1  # tokens per edge: the chosen token plus chunk-1 greedy tokens
    max_new_tokens: int = 64
    budget_tokens: int | None = None  # hard cap on LM forward tokens, prompt included (None: no cap)
    select: str = "visits"  # "visits" | "best"
    rollout: str = "greedy"  # "greedy" | "sample"
    rollout_temperature: float = 1.0  # for rollout="sample"
    rollout_tokens: int | None = None  # None: roll out to the end; k: at most k tokens, then the likelihood value
    widening: float | None = None  # progressive widening exponent (None: all expansion_width children)
    widening_k: float = 1.0
    eos_token_ids: tuple[int, ...] | None = None  # tokens that end a sequence (None: the model's EOS)
    seed: int = 0  # for sampled rollouts

    def __post_init__(self):
        checks = [
            (callable(self.reward), "MCTSConfig needs reward=callable(text, token_ids) -> float"),
            (self.simulations >= 1, "simulations must be >= 1"),
            (self.c_puct > 0, "c_puct must be > 0"),
            (self.expansion_width >= 1, "expansion_width must be >= 1"),
            (self.temperature > 0, "temperature must be > 0"),
            (self.chunk >= 1, "chunk must be >= 1"),
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.budget_tokens is None or self.budget_tokens >= 1, "budget_tokens must be >= 1"),
            (self.select in SELECTS, f"select must be one of {SELECTS}, got {self.select!r}"),
            (self.rollout in ROLLOUTS, f"rollout must be one of {ROLLOUTS}, got {self.rollout!r}"),
            (self.rollout_temperature > 0, "rollout_temperature must be > 0"),
            (self.rollout_tokens is None or self.rollout_tokens >= 1, "rollout_tokens must be >= 1 or None"),
            (self.widening is None or 0 < self.widening <= 1, "widening must be in (0, 1] or None"),
            (self.widening_k > 0, "widening_k must be > 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


@dataclass
class Node:
    tokens: tuple[int, ...]  # generated tokens from the root
    prior: float = 1.0
    visits: int = 0
    value_sum: float = 0.0
    children: list[Node] = field(default_factory=list)  # most probable first
    expanded: bool = False
    terminal: bool = False

    @property
    def q(self) -> float:
        return self.value_sum / self.visits if self.visits else 0.0


@dataclass
class MCTSStats:
    """``GenerationResult.stats`` of MCTS: the answer's reward, the best-rewarded sequence seen, and the cost.

    ``trace``: ``(forward_tokens, reward)`` for each complete sequence in the order it was scored, the tokens
    being those spent when it was; ``budget_exhausted``: the search stopped at ``budget_tokens``."""

    reward: float
    best_token_ids: list[int]
    best_reward: float
    simulations: int
    forward_tokens: int
    reused_tokens: int
    nodes: int
    trace: list[tuple[int, float]] = field(default_factory=list)
    budget_exhausted: bool = False


class MCTS:
    def __init__(self, lm, cfg: MCTSConfig, decode: Callable[[list[int]], str]):
        self.lm, self.cfg, self.decode = lm, cfg, decode
        self.rewards: dict[tuple[int, ...], float] = {}
        self.best: tuple[float, tuple[int, ...]] = (-math.inf, ())
        self.trace: list[tuple[int, float]] = []
        self.nodes = 1
        self.exhausted = False
        self.gen = torch.Generator().manual_seed(cfg.seed)
        if cfg.budget_tokens is not None and getattr(lm, "budget_tokens", None) != cfg.budget_tokens:
            raise ValueError(f"budget_tokens={cfg.budget_tokens} needs an LM that enforces it "
                             f"(its budget_tokens is {getattr(lm, 'budget_tokens', None)!r})")

    def score(self, seq: tuple[int, ...]) -> float:
        if seq not in self.rewards:
            body = [t for t in seq if t not in self.lm.eos]
            self.rewards[seq] = float(self.cfg.reward(self.decode(body), body))
            self.trace.append((self.lm.forward_tokens, self.rewards[seq]))
            if self.rewards[seq] > self.best[0]:
                self.best = (self.rewards[seq], seq)
        return self.rewards[seq]

    def _done(self, seq) -> bool:
        return bool(seq) and (seq[-1] in self.lm.eos or len(seq) >= self.cfg.max_new_tokens)

    def _extend(self, prompt, seq: tuple[int, ...], n: int | None, sample: bool) -> tuple[tuple[int, ...], list[float]]:
        """``seq`` extended until it ends or for at most ``n`` tokens, greedily or by sampling (seeded); also the
        chosen tokens' log-probabilities."""
        seq, logps = tuple(seq), []
        while not self._done(seq) and (n is None or len(logps) < n):
            logp = self.lm.next_logprobs(list(prompt) + list(seq))
            if sample:
                probs = torch.softmax(logp.float().cpu() / self.cfg.rollout_temperature, -1)  # CPU generator
                tok = int(torch.multinomial(probs, 1, generator=self.gen))
            else:
                tok = int(logp.argmax())
            logps.append(float(logp[tok]))
            seq += (tok,)
        return seq, logps

    def _greedy(self, prompt, seq: tuple[int, ...], n: int | None = None) -> tuple[int, ...]:
        return self._extend(prompt, seq, n, sample=False)[0]

    def _rollout(self, prompt, seq: tuple[int, ...]) -> float:
        """Value of ``seq`` by a rollout from it: the reward if the rollout ends, else its likelihood."""
        seq, logps = self._extend(prompt, seq, self.cfg.rollout_tokens, sample=self.cfg.rollout == "sample")
        if self._done(seq):
            return self.score(seq)
        return math.exp(sum(logps) / len(logps))

    def _expand(self, prompt, node: Node) -> None:
        logp = self.lm.next_logprobs(list(prompt) + list(node.tokens))
        top = torch.topk(logp, min(self.cfg.expansion_width, logp.shape[0]))
        priors = torch.softmax(top.values / self.cfg.temperature, -1).tolist()
        children = []
        for p, t in zip(priors, top.indices.tolist(), strict=True):
            seq = node.tokens + (t,)
            if self.cfg.chunk > 1 and not self._done(seq):
                seq = self._greedy(prompt, seq, self.cfg.chunk - 1)
            children.append(Node(seq, prior=p, terminal=self._done(seq)))
        node.children, node.expanded = children, True
        self.nodes += len(children)

    def _select(self, node: Node) -> Node:
        sqrt_n = math.sqrt(max(1, node.visits))
        fpu = node.q
        kids = node.children
        if self.cfg.widening is not None:
            kids = kids[: max(1, math.ceil(self.cfg.widening_k * (node.visits + 1) ** self.cfg.widening))]
        return max(kids, key=lambda c: (c.q if c.visits else fpu)
                   + self.cfg.c_puct * c.prior * sqrt_n / (1 + c.visits))

    def search(self, prompt: list[int]) -> tuple[Node, int]:
        root = Node(())
        sims = 0
        try:
            while sims < self.cfg.simulations:
                node, path = root, [root]
                while node.expanded and not node.terminal:
                    node = self._select(node)
                    path.append(node)
                if node.terminal:
                    value = self.score(node.tokens)
                else:
                    self._expand(prompt, node)
                    value = self._rollout(prompt, node.tokens)
                for n in path:
                    n.visits += 1
                    n.value_sum += value
                sims += 1
        except BudgetExhausted:
            self.exhausted = True  # the simulation in progress is dropped: its call was not run
        return root, sims

    def _best_under(self, prefix: tuple[int, ...]) -> tuple[float, tuple[int, ...]] | None:
        n = len(prefix)
        found = [(r, s) for s, r in self.rewards.items() if s[:n] == prefix]
        return max(found, key=lambda x: x[0]) if found else None  # first scored wins ties

    def answer(self, prompt: list[int], root: Node) -> tuple[int, ...]:
        """The chosen complete sequence, from what was scored (no LM calls); ``()`` if nothing was."""
        if self.cfg.select == "best" or not self.rewards:
            return self.best[1]
        node = root
        while True:
            kids = [c for c in node.children if c.visits and self._best_under(c.tokens)]
            if not kids:
                break
            node = max(kids, key=lambda c: (c.visits, c.q))
        return self._best_under(node.tokens)[1]


def mcts_generate(engine, prompts, cfg: MCTSConfig, lm_factory=None) -> list[GenerationResult]:
    if not isinstance(cfg, MCTSConfig):
        raise TypeError(f"MCTS takes an MCTSConfig, got {type(cfg).__name__}")
    out = []
    all_ids = engine.encode_all(prompts)
    eos = engine.stop_ids(cfg.eos_token_ids)
    for i, ids in enumerate(all_ids):
        if cfg.budget_tokens is not None and cfg.budget_tokens < len(ids):
            raise ValueError(f"budget_tokens={cfg.budget_tokens} is smaller than the prompt ({len(ids)} tokens): "
                             "the budget counts the prompt's prefill")
        lm = lm_factory() if lm_factory else EngineLM(engine, len(ids) + cfg.max_new_tokens + cfg.chunk + 1,
                                                      request=i, n_requests=len(all_ids),
                                                      budget_tokens=cfg.budget_tokens, eos=eos)
        decode = lambda t: engine.tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
        search = MCTS(lm, cfg, decode)
        root, sims = search.search(ids)
        seq = search.answer(ids, root)
        reward = search.rewards.get(seq, 0.0) if seq else 0.0
        # the shared stop rules on the chosen sequence: EOS ends it, the token budget caps it
        stop = engine.stopper(ids, cfg.max_new_tokens, eos_token_ids=tuple(lm.eos))
        for tok in seq:
            if stop.done:
                break
            stop.push(tok)
        res = stop.result
        if not stop.done:
            res.text = decode(res.token_ids)
            if not seq:
                res.finish_reason = "length"  # the budget ran out before any sequence was complete
        best_r, best_seq = search.best
        res.stats = MCTSStats(reward, [t for t in best_seq if t not in lm.eos], best_r, sims, lm.forward_tokens,
                              lm.reused_tokens, search.nodes, list(search.trace), search.exhausted)
        out.append(res)
    return out
