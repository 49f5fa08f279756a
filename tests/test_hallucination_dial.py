"""The factual-to-imaginative dial: its knobs per level, level 0 = plain greedy decoding, steering at higher
levels, and the factual scores against a direct computation from HF logits (tiny random Llama)."""

from __future__ import annotations

import math

import pytest
import torch

from workbench.engine import Engine
from workbench.engine.config import GREEDY, GenerationConfig
from workbench.hallucination.dial import Dial, DialConfig, factual_scores, train_creative_vector
from workbench.models.tiny import build_tiny


@pytest.fixture(scope="module")
def setup():
    model, tok = build_tiny("llama")
    engine = Engine(model.eval(), tok, threads=None)
    return engine, train_creative_vector(model, tok)


def test_knobs_per_level(setup):
    engine, vec = setup
    dial = Dial(engine, vec, DialConfig(max_temperature=1.5, max_strength=4.0, top_p=0.9))
    s0, k0 = dial.settings(0)
    s1, k1 = dial.settings(0.5)
    assert s0.greedy and k0 == 0 and s0.top_p == 1.0
    assert s1.temperature == pytest.approx(0.75) and k1 == pytest.approx(2.0) and s1.top_p == 0.9
    for bad in (-0.1, 1.01):
        with pytest.raises(ValueError, match="in \\[0, 1\\]"):
            dial.settings(bad)
    with pytest.raises(ValueError):
        DialConfig(max_temperature=-1)


def test_level_zero_is_greedy_and_higher_levels_steer(setup):
    engine, vec = setup
    prompts = [[5, 9, 13, 22], [3, 4, 5]]
    dial = Dial(engine, vec, DialConfig(max_temperature=0.0, max_strength=8.0))  # steering only
    plain = engine.generate(prompts, GenerationConfig(max_new_tokens=8, sampling=GREEDY))
    assert [r.token_ids for r in dial.generate(prompts, 0, max_new_tokens=8)] == [r.token_ids for r in plain]
    steered = dial.generate(prompts, 1.0, max_new_tokens=8)
    assert [r.token_ids for r in steered] != [r.token_ids for r in plain]
    assert not engine._interventions, "the steering block was removed"


def test_factual_scores_equal_hf(setup):
    engine, _ = setup
    model = engine.model
    prompt, answer = [5, 9, 13, 22], [40, 41, 7]
    got = factual_scores(engine, [prompt], [answer])[0]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([prompt + answer])).logits[0].float(), -1)
    steps = lp[len(prompt) - 1: len(prompt) - 1 + len(answer)]
    nll = -steps.gather(1, torch.tensor(answer)[:, None]).mean().item()
    ent = -(steps.exp() * steps).sum(-1).mean().item()
    assert got["token-logprob"] == pytest.approx(nll, abs=1e-4)
    assert got["token-entropy"] == pytest.approx(ent, abs=1e-4)
    assert math.isnan(factual_scores(engine, [prompt], [[]])[0]["token-logprob"])
