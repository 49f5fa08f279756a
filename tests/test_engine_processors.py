"""Logits processors against transformers' own warpers, and the sampler against its target distribution."""

import pytest
import stats
import torch
from transformers.generation import logits_process as hf

from workbench.engine import SamplingParams, processors, sampling

V = 97


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, V, generator=g) * 3


def _ids():
    return torch.randint(0, V, (3, 12), generator=torch.Generator().manual_seed(1))


def _same(a, b):
    assert torch.equal(torch.isinf(a), torch.isinf(b))
    fin = torch.isfinite(a)
    torch.testing.assert_close(a[fin], b[fin], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k", [1, 5, 50, V, V + 10])
def test_top_k_matches_hf(logits, k):
    _same(processors.top_k(logits, [k] * 3), hf.TopKLogitsWarper(k)(None, logits.clone()))


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_matches_hf(logits, p):
    _same(processors.top_p(logits, [p] * 3), hf.TopPLogitsWarper(p)(None, logits.clone()))


@pytest.mark.parametrize("p", [0.01, 0.1, 0.5])
def test_min_p_matches_hf(logits, p):
    _same(processors.min_p(logits, [p] * 3), hf.MinPLogitsWarper(p)(None, logits.clone()))


@pytest.mark.parametrize("p", [0.2, 0.6, 0.95])
def test_typical_matches_hf(logits, p):
    _same(processors.typical(logits, [p] * 3), hf.TypicalLogitsWarper(p)(None, logits.clone()))


@pytest.mark.parametrize("t", [0.3, 1.0, 2.5])
def test_temperature_matches_hf(logits, t):
    _same(processors.temperature(logits, [t] * 3), hf.TemperatureLogitsWarper(t)(None, logits.clone()))


@pytest.mark.parametrize("pen", [0.7, 1.3])
def test_repetition_penalty_matches_hf(logits, pen):
    ids = _ids()
    seen = torch.zeros(3, V, dtype=torch.bool).scatter(1, ids, True)
    _same(processors.repetition_penalty(logits, seen, [pen] * 3), hf.RepetitionPenaltyLogitsProcessor(pen)(ids, logits.clone()))


def test_per_row_parameters(logits):
    out = processors.top_k(logits, [1, 0, 3])
    assert (torch.isfinite(out).sum(-1) == torch.tensor([1, V, 3])).all()
    out = processors.top_p(logits, [1e-9, 1.0, 1.0])
    assert torch.isfinite(out[0]).sum() == 1 and torch.isfinite(out[1:]).all()


def test_frequency_presence_and_bias(logits):
    counts = torch.zeros(3, V, dtype=torch.int32)
    counts[0, 4] = 3
    out = processors.frequency_presence(logits, counts, [0.5, 0, 0], [0.25, 0, 0])
    assert out[0, 4] == pytest.approx(logits[0, 4] - 1.5 - 0.25)
    out[0, 4] = logits[0, 4]
    assert torch.equal(out, logits)
    out = processors.logit_bias(logits, [{7: -100.0}, {}, {}])
    assert out[0, 7] == pytest.approx(logits[0, 7] - 100) and torch.equal(out[1:], logits[1:])
    with pytest.raises(ValueError, match="vocab size"):
        processors.logit_bias(logits, [{V: 1.0}, {}, {}])


@pytest.mark.parametrize("kwargs,msg", [
    ({"top_p": 1.5}, "top_p"), ({"top_p": 0.0}, "top_p"), ({"temperature": -1}, "temperature"),
    ({"top_k": -1}, "top_k"), ({"min_p": 2.0}, "min_p"), ({"typical_p": 0.0}, "typical_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"frequency_penalty": 3.0}, "frequency_penalty"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias"),
])
def test_bad_sampling_params(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kwargs)


def _empirical(logits_row, params, n, seed=0):
    x = processors.process(logits_row.repeat(n, 1), [params] * n, torch.zeros(n, V, dtype=torch.bool),
                           torch.zeros(n, V, dtype=torch.int32))
    gen = torch.Generator().manual_seed(seed)
    # one generator shared by all rows is fine here: rows draw one after another from it
    draws = sampling.choose(x, [params.greedy] * n, [gen] * n)
    return torch.bincount(draws, minlength=V), x[0].softmax(-1)


N_DRAWS = 20_000  # covers every token of mass >= stats.MIN_SEEN / N_DRAWS = 0.1% by the presence check


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=10),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(min_p=0.05),
])
def test_sampler_matches_target_distribution(logits, params):
    """20k draws against the processed softmax (fixed seed): support, presence of every token of mass >= 0.1%,
    pooled chi-square p > 1e-3, total variation < 0.03."""
    counts, target = _empirical(logits[0], params, N_DRAWS)
    stats.check_draws(counts, target, tv_max=0.03)
    # the same checks at the same number of draws reject a sampler that loses the lightest covered token
    stats.assert_detects_a_dropped_token(target, N_DRAWS, tv_max=0.03)


def test_sampler_detects_a_wrong_distribution(logits):
    """The same statistic rejects the real sampler's draws against a distorted target (the test above can fail)."""
    counts, _ = _empirical(logits[0], SamplingParams(temperature=1.0), N_DRAWS)
    assert stats.chisquare_pvalue(counts, (logits[0] / 0.8).softmax(-1)) < 1e-6
    assert stats.rejects(counts, (logits[0] / 0.8).softmax(-1))


def test_sampler_detects_a_dropped_token(logits):
    """The real sampler's draws fail against a target with one more token than the sampler draws from: top-k=10
    draws checked against the top-k=11 distribution, whose 11th token has a low mass (0.15%)."""
    counts, _ = _empirical(logits[0], SamplingParams(top_k=10), N_DRAWS)
    _, wider = _empirical(logits[0], SamplingParams(top_k=11), 1)
    extra = float(wider[wider > 0].min())
    assert stats.MIN_SEEN / N_DRAWS <= extra < 0.01
    assert stats.rejects(counts, wider)


def test_greedy_rows_are_argmax(logits):
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    out = sampling.choose(logits, [True, False, True], gens)
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()
