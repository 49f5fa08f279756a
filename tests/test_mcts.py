"""MCTS over tokens: finds the rewarded sequence greedy misses; KV prefix reuse is exact and counted."""

import pytest
import torch

from workbench.engine import Engine
from workbench.engine.mcts import MCTS, EngineLM, MCTSConfig, mcts_generate
from workbench.models.tiny import build_tiny
from workbench.rewards import ExactAnswer, UnitTests

EOS = 3


class ToyLM:
    """Deterministic toy model over tokens {0, 1, 2, EOS=3}: greedy walks into a trap.

    Greedy takes 1 (p=.6), then EOS: reward 0. The only rewarded sequence is 2, 2, EOS, whose first step has
    prior .4 and whose second step is not the greedy choice after 2 (0 is)."""

    vocab_size = 4
    eos = frozenset([EOS])

    def __init__(self):
        self.forward_tokens = 0
        self.reused_tokens = 0

    def next_logprobs(self, tokens):
        gen = tuple(tokens[1:])  # tokens[0] is the prompt
        self.forward_tokens += 1
        table = {(): [0.0, 0.6, 0.4, 0.0], (1,): [0.05, 0.05, 0.0, 0.9], (2,): [0.5, 0.3, 0.2, 0.0]}
        probs = table.get(gen, [0.0, 0.0, 0.0, 1.0])
        return torch.tensor(probs).clamp(min=1e-9).log()


def toy_reward(text, tokens):
    return 1.0 if tokens == [2, 2] else 0.0


def run_toy(**kw):
    cfg = MCTSConfig(reward=toy_reward, max_new_tokens=5, expansion_width=4, **kw)
    search = MCTS(ToyLM(), cfg, decode=lambda t: " ".join(map(str, t)))
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
    search, _, sims = run_toy(simulations=1000, budget_tokens=12)
    assert search.lm.forward_tokens < 12 + 6 and sims < 1000


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


def test_bad_configs():
    with pytest.raises(ValueError, match="reward"):
        MCTSConfig()
    with pytest.raises(ValueError, match="select"):
        MCTSConfig(reward=toy_reward, select="mean")
    model, tok = build_tiny("llama")
    with pytest.raises(TypeError, match="MCTSConfig"):
        mcts_generate(Engine(model, tok), ["x"], object())
