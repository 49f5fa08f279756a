"""Goodness of fit for samplers, shared by the engine's torch sampler tests, the Triton kernel tests and the
GPU tests: draws (token counts) against the distribution they should follow.

Three checks, from the sharpest to the broadest:

- no draw outside the support (a filter that leaks);
- every kept token expected at least ``MIN_SEEN`` times was drawn at least once: a correct sampler misses
  such a token with probability ``<= e^-MIN_SEEN`` (2e-9), a sampler that drops it always does. This is what
  catches a dropped low-mass token, which the chi-square alone barely notices (its statistic grows by about
  the token's expected count);
- a chi-square goodness of fit over the support, rare bins pooled so the approximation holds.

``covered`` and ``lightest_covered`` say which tokens the presence check covers at a given number of draws,
so a test can require that every kept token is covered; ``without`` builds the negative control (the target
with one token dropped) that the checks must reject at the same number of draws.
"""

from __future__ import annotations

import torch
from scipy import stats

MIN_EXPECTED = 5  # chi-square bins expected fewer times are pooled into one
MIN_SEEN = 20  # P(a token expected >= 20 times is never drawn) <= e^-20 ~ 2e-9
P_MIN = 1e-3  # chi-square p-value below which the draws are rejected


def chisquare_pvalue(counts: torch.Tensor, target: torch.Tensor) -> float:
    """Pooled chi-square p-value of ``counts`` (``[V]`` draws per token) against ``target`` (``[V]``
    probabilities), over the target's support; bins expected fewer than ``MIN_EXPECTED`` times are pooled
    (and the pool dropped if it is itself that rare)."""
    counts, target = counts.detach().cpu().double(), target.detach().cpu().double()
    n = counts.sum()
    support = target > 0
    expected = target[support] / target[support].sum() * n
    big = expected >= MIN_EXPECTED
    obs = torch.cat([counts[support][big], counts[support][~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    if exp[-1] < MIN_EXPECTED:
        obs, exp = obs[:-1], exp[:-1]
    if obs.numel() < 2:
        return 1.0  # one bin: nothing to test beyond the support check
    exp = exp * obs.sum() / exp.sum()
    return float(stats.chisquare(obs.numpy(), exp.numpy()).pvalue)


def covered(target: torch.Tensor, n: int) -> torch.Tensor:
    """Bool ``[V]``: the kept tokens the presence check covers with ``n`` draws."""
    return (target > 0) & (target.double() * n >= MIN_SEEN)


def lightest_covered(target: torch.Tensor, n: int) -> int:
    """The lowest-mass token the presence check covers with ``n`` draws."""
    cov = covered(target, n)
    assert cov.any(), f"{n} draws cover no token of this target"
    return int(torch.where(cov, target.double(), float("inf")).argmin())


def without(target: torch.Tensor, token: int) -> torch.Tensor:
    """``target`` with ``token`` dropped and the rest renormalised: a sampler that loses one token."""
    t = target.double().clone()
    t[token] = 0
    return t / t.sum()


def multinomial_counts(target: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """``[V]`` counts of ``n`` exact draws from ``target`` (for negative controls)."""
    draws = torch.multinomial(target.double().cpu(), n, replacement=True, generator=torch.Generator().manual_seed(seed))
    return torch.bincount(draws, minlength=target.numel())


def check_draws(counts: torch.Tensor, target: torch.Tensor, *, p_min: float = P_MIN, tv_max: float | None = None,
                all_covered: bool = False) -> None:
    """Assert that ``counts`` (``[V]`` draws per token) follow ``target`` (``[V]`` probabilities).

    ``all_covered``: also require that the draws are enough for the presence check to cover every kept
    token (the test then detects a sampler that drops any one of them). ``tv_max``: a bound on the total
    variation distance between the empirical and the target distribution."""
    counts, target = counts.detach().cpu().long(), target.detach().cpu().double()
    assert counts.shape == target.shape, (counts.shape, target.shape)
    n = int(counts.sum())
    support = target > 0
    assert counts[~support].sum() == 0, f"drew filtered-out tokens {(~support & (counts > 0)).nonzero().flatten().tolist()}"
    if all_covered:
        light = float(target[support].min()) * n
        assert light >= MIN_SEEN, f"too few draws: the lightest kept token is expected {light:.1f} < {MIN_SEEN} times"
    missing = covered(target, n) & (counts == 0)
    assert not missing.any(), f"never drew tokens expected >= {MIN_SEEN} times: {missing.nonzero().flatten().tolist()}"
    p = chisquare_pvalue(counts, target)
    assert p > p_min, f"chi-square p = {p:.3g} <= {p_min}"
    if tv_max is not None:
        tv = 0.5 * float((counts.double() / n - target / target.sum()).abs().sum())
        assert tv < tv_max, f"total variation {tv:.4f} >= {tv_max}"


def rejects(counts: torch.Tensor, target: torch.Tensor, **kwargs) -> bool:
    """Whether :func:`check_draws` fails on these counts (for negative controls)."""
    try:
        check_draws(counts, target, **kwargs)
    except AssertionError:
        return True
    return False


def assert_detects_a_dropped_token(target: torch.Tensor, n: int, seed: int = 0, **kwargs) -> int:
    """Negative control: ``n`` exact draws from ``target`` with its lightest covered token dropped must be
    rejected, and ``n`` exact draws from ``target`` itself accepted. Returns the dropped token."""
    tok = lightest_covered(target, n)
    assert not rejects(multinomial_counts(target, n, seed), target, **kwargs), "rejects exact draws"
    assert rejects(multinomial_counts(without(target, tok), n, seed), target, **kwargs), f"missed dropped token {tok}"
    return tok
