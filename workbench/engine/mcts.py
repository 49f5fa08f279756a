"""Monte Carlo tree search over tokens (or token chunks) with a pluggable reward.

PUCT selection as in AlphaZero (Silver et al. 2017): ``Q(child) + c_puct * P(child) * sqrt(N(parent)) /
(1 + N(child))``, priors ``P`` from the LM (temperature, top ``expansion_width`` tokens renormalised), unvisited
children valued at their parent's mean (first-play urgency). A leaf is expanded with one LM call, valued by a
greedy rollout to the end scored by the reward (or by the reward directly if it is terminal), and the value is
backed up as a running mean. The answer follows the most visited children (``select="visits"``) or is the
best-rewarded complete sequence seen (``select="best"``).

The reward is any callable ``(text, token_ids) -> float`` (ready-made ones, with their sandbox, are in
:mod:`workbench.rewards`). The LM side reuses KV prefixes across tree nodes: one session holds the last
evaluated sequence, and the next request only runs the tokens after the longest common prefix (the session is
truncated to it, on every backend). ``forward_tokens``
and ``reused_tokens`` report what was recomputed and what was saved; ``budget_tokens`` caps forward tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from workbench.engine.results import GenerationResult

Reward = Callable[[str, list[int]], float]  # e.g. workbench.rewards.ExactAnswer / UnitTests


# -- the LM side ---------------------------------------------------------------------------------------------


class EngineLM:
    """Next-token log-probabilities for arbitrary sequences through the engine's step API, reusing the KV cache's
    longest common prefix (on every backend: the session is truncated to it and only the rest runs)."""

    def __init__(self, engine, max_len: int, request: int = 0, n_requests: int = 1):
        self.engine = engine
        self.max_len = max_len
        self.request, self.n_requests = request, n_requests  # for per-request offsets
        self.session = None
        self.seq: list[int] = []
        self.logits = None
        self.forward_tokens = 0
        self.reused_tokens = 0
        self.vocab_size = engine.vocab_size
        self.eos = engine.default_eos()

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
            self.session = self.engine.start([tokens], self.max_len - len(tokens), requests=[self.request],
                                             n_requests=self.n_requests)
            logits, ran, lcp = self.session.logits[0], len(tokens), 0
        else:
            self.session.truncate(lcp)  # slots past the common prefix are overwritten
            logits, ran = self.session.step([tokens[lcp:]])[0, -1], len(tokens) - lcp
        self.forward_tokens += ran
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
    budget_tokens: int | None = None  # cap on LM forward tokens (None: no cap)
    select: str = "visits"  # "visits" | "best"

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
            (self.select in ("visits", "best"), f"select must be 'visits' or 'best', got {self.select!r}"),
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
    children: list[Node] = field(default_factory=list)
    expanded: bool = False
    terminal: bool = False

    @property
    def q(self) -> float:
        return self.value_sum / self.visits if self.visits else 0.0


@dataclass
class MCTSStats:
    """``GenerationResult.stats`` of MCTS: the answer's reward, the best-rewarded sequence seen, and the cost."""

    reward: float
    best_token_ids: list[int]
    best_reward: float
    simulations: int
    forward_tokens: int
    reused_tokens: int
    nodes: int


class MCTS:
    def __init__(self, lm, cfg: MCTSConfig, decode: Callable[[list[int]], str]):
        self.lm, self.cfg, self.decode = lm, cfg, decode
        self.rewards: dict[tuple[int, ...], float] = {}
        self.best: tuple[float, tuple[int, ...]] = (-math.inf, ())
        self.nodes = 1

    def score(self, seq: tuple[int, ...]) -> float:
        if seq not in self.rewards:
            body = [t for t in seq if t not in self.lm.eos]
            self.rewards[seq] = float(self.cfg.reward(self.decode(body), body))
            if self.rewards[seq] > self.best[0]:
                self.best = (self.rewards[seq], seq)
        return self.rewards[seq]

    def _done(self, seq) -> bool:
        return bool(seq) and (seq[-1] in self.lm.eos or len(seq) >= self.cfg.max_new_tokens)

    def _greedy(self, prompt, seq: tuple[int, ...], n: int | None = None) -> tuple[int, ...]:
        seq = tuple(seq)
        steps = 0
        while not self._done(seq) and (n is None or steps < n):
            seq += (int(self.lm.next_logprobs(list(prompt) + list(seq)).argmax()),)
            steps += 1
        return seq

    def _expand(self, prompt, node: Node) -> None:
        logp = self.lm.next_logprobs(list(prompt) + list(node.tokens))
        top = torch.topk(logp, min(self.cfg.expansion_width, logp.shape[0]))
        priors = torch.softmax(top.values / self.cfg.temperature, -1).tolist()
        for p, t in zip(priors, top.indices.tolist(), strict=True):
            seq = node.tokens + (t,)
            if self.cfg.chunk > 1 and not self._done(seq):
                seq = self._greedy(prompt, seq, self.cfg.chunk - 1)
            node.children.append(Node(seq, prior=p, terminal=self._done(seq)))
        self.nodes += len(node.children)
        node.expanded = True

    def _select(self, node: Node) -> Node:
        sqrt_n = math.sqrt(max(1, node.visits))
        fpu = node.q
        return max(node.children, key=lambda c: (c.q if c.visits else fpu)
                   + self.cfg.c_puct * c.prior * sqrt_n / (1 + c.visits))

    def _over_budget(self) -> bool:
        return self.cfg.budget_tokens is not None and self.lm.forward_tokens >= self.cfg.budget_tokens

    def search(self, prompt: list[int]) -> tuple[Node, int]:
        root = Node(())
        sims = 0
        while sims < self.cfg.simulations and not self._over_budget():
            node, path = root, [root]
            while node.expanded and not node.terminal:
                node = self._select(node)
                path.append(node)
            if node.terminal:
                value = self.score(node.tokens)
            else:
                self._expand(prompt, node)
                value = self.score(self._greedy(prompt, node.tokens))
            for n in path:
                n.visits += 1
                n.value_sum += value
            sims += 1
        return root, sims

    def answer(self, prompt: list[int], root: Node) -> tuple[int, ...]:
        if self.cfg.select == "best" and self.best[1]:
            return self.best[1]
        node = root
        while node.children and any(c.visits for c in node.children):
            node = max(node.children, key=lambda c: (c.visits, c.q))
        return self._greedy(prompt, node.tokens)


def mcts_generate(engine, prompts, cfg: MCTSConfig, lm_factory=None) -> list[GenerationResult]:
    if not isinstance(cfg, MCTSConfig):
        raise TypeError(f"MCTS takes an MCTSConfig, got {type(cfg).__name__}")
    out = []
    all_ids = engine.encode_all(prompts)
    for i, ids in enumerate(all_ids):
        lm = lm_factory() if lm_factory else EngineLM(engine, len(ids) + cfg.max_new_tokens + cfg.chunk + 1,
                                                      request=i, n_requests=len(all_ids))
        decode = lambda t: engine.tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
        search = MCTS(lm, cfg, decode)
        root, sims = search.search(ids)
        seq = search.answer(ids, root)
        reward = search.score(seq)
        # the shared stop rules on the chosen sequence: EOS ends it, the token budget caps it
        stop = engine.stopper(ids, cfg.max_new_tokens, eos_token_ids=tuple(lm.eos))
        for tok in seq:
            if stop.done:
                break
            stop.push(tok)
        res = stop.result
        if not stop.done:
            res.text = decode(res.token_ids)
        best_r, best_seq = search.best
        res.stats = MCTSStats(reward, [t for t in best_seq if t not in lm.eos], best_r, sims, lm.forward_tokens,
                              lm.reused_tokens, search.nodes)
        out.append(res)
    return out
