"""MCTS over tokens: finds the rewarded sequence greedy misses; KV prefix reuse is exact and counted; the token
budget is a hard cap, and one traced run gives the outcome under every smaller cap."""

import math

import pytest
import torch

from workbench.engine import Engine
from workbench.engine.mcts import MCTS, BudgetExhausted, EngineLM, MCTSConfig, mcts_generate
from workbench.models.tiny import build_tiny
from workbench.rewards import ExactAnswer, UnitTests

EOS = 3


class ToyLM:
    """Deterministic toy model over tokens {0, 1, 2, EOS=3}: greedy walks into a trap.

    Greedy takes 1 (p=.6), then EOS: reward 0. The only rewarded sequence is 2, 2, EOS, whose first step has
    prior .4 and whose second step is not the greedy choice after 2 (0 is)."""

    vocab_size = 4
    eos = frozenset([EOS])

    def __init__(self, budget_tokens=None):
        self.forward_tokens = 0
        self.reused_tokens = 0
        self.budget_tokens = budget_tokens
        self.calls = []

    def next_logprobs(self, tokens):
        gen = tuple(tokens[1:])  # tokens[0] is the prompt
        if self.budget_tokens is not None and self.forward_tokens + 1 > self.budget_tokens:
            raise BudgetExhausted("toy budget")
        self.forward_tokens += 1
        self.calls.append(gen)
        table = {(): [0.0, 0.6, 0.4, 0.0], (1,): [0.05, 0.05, 0.0, 0.9], (2,): [0.5, 0.3, 0.2, 0.0]}
        probs = table.get(gen, [0.0, 0.0, 0.0, 1.0])
        return torch.tensor(probs).clamp(min=1e-9).log()


def toy_reward(text, tokens):
    return 1.0 if tokens == [2, 2] else 0.0


def run_toy(**kw):
    cfg = MCTSConfig(reward=toy_reward, max_new_tokens=5, expansion_width=4, **kw)
    search = MCTS(ToyLM(cfg.budget_tokens), cfg, decode=lambda t: " ".join(map(str, t)))
    root, sims = search.search([99])
    return search, search.answer([99], root), sims


def test_mcts_finds_what_greedy_misses():
    search, _, _ = run_toy(simulations=1)
    greedy = search._greedy([99], ())
    assert greedy == (1, EOS) and toy_reward("", [1]) == 0.0
    search, answer, sims = run_toy(simulations=40)
    assert answer == (2, 2, EOS) and search.best == (1.0, (2, 2, EOS))
    assert sims == 40


def test_budget_caps_forward_tokens():
    full, _, _ = run_toy(simulations=1000)
    assert full.lm.forward_tokens == 18  # the whole toy tree
    for budget in range(1, 18):
        search, answer, sims = run_toy(simulations=1000, budget_tokens=budget)
        assert search.lm.forward_tokens <= budget and sims < 1000 and search.exhausted
    # an LM that does not enforce the budget is refused rather than silently overspending
    with pytest.raises(ValueError, match="enforces"):
        MCTS(ToyLM(), MCTSConfig(reward=toy_reward, budget_tokens=5), decode=str)


def test_capped_run_is_the_uncapped_trace_cut():
    """The trace of one long run gives every shorter run's candidates and best reward."""
    full, _, _ = run_toy(simulations=60)
    assert full.best[0] == 1.0 and len(full.trace) >= 3
    for budget in range(1, full.lm.forward_tokens + 1):
        capped, answer, _ = run_toy(simulations=60, budget_tokens=budget, select="best")
        assert capped.trace == [e for e in full.trace if e[0] <= budget]
        best = max((r for t, r in full.trace if t <= budget), default=None)
        assert (capped.best[0] if capped.rewards else None) == best
        assert answer == (capped.best[1] if capped.rewards else ())


def test_answer_spends_no_tokens():
    for select in ("visits", "best"):
        cfg = MCTSConfig(reward=toy_reward, max_new_tokens=5, expansion_width=4, simulations=7, select=select)
        search = MCTS(ToyLM(), cfg, decode=str)
        root, _ = search.search([99])
        spent = search.lm.forward_tokens
        seq = search.answer([99], root)
        assert search.lm.forward_tokens == spent and seq in search.rewards


def test_progressive_widening_limits_children():
    """With widening, a node with N visits chooses among its ceil(k (N+1)^a) most probable children only."""
    kw = dict(simulations=6, c_puct=50.0, temperature=100.0)  # flat priors: every child it may choose is visited

    def visited(**extra):
        search, _, _ = run_toy(**kw, **extra)
        root, _ = search.search([99])  # a fresh tree with the same settings
        return [c.tokens for c in root.children if c.visits]

    assert len(visited()) == 4  # every child, the zero-prior ones too
    # root visits go 0..5: at most ceil(sqrt(6)) = 3 children, the most probable first (1, 2, then 0 or 3)
    narrow = visited(widening=0.5)
    assert 1 < len(narrow) <= 3 and narrow[:2] == [(1,), (2,)]


def test_short_rollouts_use_the_likelihood_value():
    cfg = MCTSConfig(reward=toy_reward, max_new_tokens=5, expansion_width=4, simulations=1, rollout_tokens=1)
    search = MCTS(ToyLM(), cfg, decode=str)
    root, _ = search.search([99])
    # the root is expanded, then one rollout token: greedy picks 1 (p = .6), not terminal -> value .6
    assert math.isclose(root.q, 0.6, rel_tol=1e-5) and not search.rewards


def test_sampled_rollouts_are_seeded():
    runs = [run_toy(simulations=20, rollout="sample", seed=s)[0] for s in (0, 0, 1, 2, 3)]
    assert runs[0].trace == runs[1].trace  # same seed, same search
    assert any(r.trace != runs[0].trace for r in runs[2:])
    assert all(r.best == (1.0, (2, 2, EOS)) for r in runs)


def test_engine_lm_budget_refuses_before_running():
    model, tok = build_tiny("llama")
    lm = EngineLM(Engine(model, tok), max_len=64, budget_tokens=7)
    lm.next_logprobs([5, 6, 7, 8, 9])  # 5 tokens
    with pytest.raises(BudgetExhausted):
        lm.next_logprobs([5, 6, 1, 2, 3, 4])  # 4 more would make 9
    assert lm.forward_tokens == 5
    # the session still holds [5..9]: a cheap continuation runs, exactly
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([[5, 6, 7, 8, 9, 10]])).logits[0, -1], -1)
    torch.testing.assert_close(lm.next_logprobs([5, 6, 7, 8, 9, 10]), ref, atol=1e-5, rtol=1e-5)
    assert lm.forward_tokens == 6


@pytest.mark.parametrize("backend", ["hf", "auto"])
def test_engine_mcts_hard_budget_and_trace(backend):
    """On both backends: forward tokens never pass the cap, and capped runs equal the traced run cut."""
    model, tok = build_tiny("llama")
    eng = Engine(model, tok, backend=backend)
    ids = eng.encode_all(["hi there"])[0]
    reward = lambda text, t: (len(set(t)) % 3) / 2  # noqa: E731 (deterministic, varied)
    base = dict(reward=reward, simulations=200, max_new_tokens=6, expansion_width=3, select="best")
    [full] = eng.generate([ids], MCTSConfig(**base, budget_tokens=len(ids) + 60), strategy="mcts")
    assert full.stats.forward_tokens <= len(ids) + 60 and full.stats.budget_exhausted
    for extra in (3, 11, 25):
        cap = len(ids) + extra
        [r] = eng.generate([ids], MCTSConfig(**base, budget_tokens=cap), strategy="mcts")
        assert r.stats.forward_tokens <= cap
        assert r.stats.trace == [e for e in full.stats.trace if e[0] <= cap]
    with pytest.raises(ValueError, match="smaller than the prompt"):
        eng.generate([ids], MCTSConfig(**base, budget_tokens=len(ids) - 1), strategy="mcts")


def test_custom_stop_tokens_end_sequences():
    model, tok = build_tiny("llama")
    eng = Engine(model, tok)
    [g] = eng.generate(["hi"], None)
    i = next(i for i, t in enumerate(g.token_ids) if i and t not in g.token_ids[:i])
    stop = g.token_ids[i]  # a later greedy token, new at its place, becomes a stop token
    cfg = MCTSConfig(reward=lambda text, t: 1.0, simulations=1, max_new_tokens=8, eos_token_ids=(stop,))
    [r] = eng.generate(["hi"], cfg, strategy="mcts")
    assert r.token_ids == g.token_ids[:i] and r.finish_reason == "eos"


def test_engine_lm_prefix_reuse_is_exact():
    model, tok = build_tiny("llama")
    lm = EngineLM(Engine(model, tok), max_len=64)
    seqs = [[5, 6, 7, 8, 9], [5, 6, 7, 1], [5, 6, 7, 1, 2, 3], [5, 6], [40, 41, 42]]
    for s in seqs:
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([s])).logits[0, -1], -1)
        torch.testing.assert_close(lm.next_logprobs(s), ref, atol=1e-5, rtol=1e-5)
    # tokens run: 5 + 1 + 2 + 1 + 3; reused: 3 + 4 + 1 + 0
    assert lm.forward_tokens == 12 and lm.reused_tokens == 8


def test_mcts_on_tiny_model_reports_reuse():
    model, tok = build_tiny("llama")
    target = tok.decode(Engine(model, tok).generate(["hi"], None)[0].token_ids[:3])
    cfg = MCTSConfig(reward=lambda text, ids: float(text.startswith(target)), simulations=12, max_new_tokens=6,
                     expansion_width=3)
    [res] = Engine(model, tok).generate(["hi"], cfg, strategy="mcts")
    st = res.stats
    assert st.simulations == 12 and st.reused_tokens > st.forward_tokens > 0
    assert st.best_reward == 1.0 and st.nodes > 12


def test_rewards():
    assert ExactAnswer(42)("The answer is 42.", []) == 1.0
    assert ExactAnswer(42)("17 + 25 = 42", []) == 1.0
    assert ExactAnswer(42)("It is 42, no, 41", []) == 0.0
    assert ExactAnswer(1234)("1,234", []) == 1.0
    ut = UnitTests(("assert add(1, 2) == 3", "assert add(0, 0) == 1"), prefix="def add(a, b):\n")
    assert ut("    return a + b\n", []) == 0.5
    assert ut("```python\ndef add(a, b):\n    return a + b\n```\nDone.", []) == 0.5
    assert ut("    return a + b\n```\nThis adds.", []) == 0.5  # the prompt opened the block: cut at its end
    assert ut("Here it is:\n```python\ndef add(a, b):\n    return a + b\n```", []) == 0.5  # prose, then a block


def test_bad_configs():
    with pytest.raises(ValueError, match="reward"):
        MCTSConfig()
    with pytest.raises(ValueError, match="select"):
        MCTSConfig(reward=toy_reward, select="mean")
    with pytest.raises(ValueError, match="rollout must"):
        MCTSConfig(reward=toy_reward, rollout="beam")
    with pytest.raises(ValueError, match="widening"):
        MCTSConfig(reward=toy_reward, widening=1.5)
    with pytest.raises(ValueError, match="rollout_tokens"):
        MCTSConfig(reward=toy_reward, rollout_tokens=0)
    model, tok = build_tiny("llama")
    with pytest.raises(TypeError, match="MCTSConfig"):
        mcts_generate(Engine(model, tok), ["x"], object())
