"""Detector quality: AUROC, the rejection-accuracy curve and its area (AURAC), bootstrap confidence intervals.

Conventions: a detector score is higher for answers more likely hallucinated; ``hallucinated`` labels are 1 for
a wrong answer, 0 for a right one; ``correct`` is the complement.

- **AUROC**: the probability that a random wrong answer scores above a random right one, ties counting half
  (the Mann-Whitney statistic; equals ``sklearn.metrics.roc_auc_score(hallucinated, scores)``).
- **Rejection-accuracy curve** (Farquhar et al. 2024): answer only the ``k`` lowest-score questions and
  measure the accuracy on those, for ``k = 1 .. n``. Tied scores are broken at random, in expectation: a tie
  group that straddles the cut contributes its mean accuracy per kept item. **AURAC** is the mean of that
  curve over ``k`` (the area under accuracy against the retained fraction, a step function on ``(0, 1]``): it
  equals the accuracy for a score carrying no information, and is maximal when every wrong answer scores above
  every right one (:func:`aurac_oracle`).
- **Bootstrap**: resample the questions with replacement (percentile interval); resamples where the metric is
  undefined (one class only, for AUROC) are dropped and counted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np


def _as_arrays(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=float).ravel()
    s = np.asarray(scores, dtype=float).ravel()
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels for {s.size} scores")
    if y.size == 0:
        raise ValueError("no labels")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite (got NaN or inf)")
    return y, s


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties given their mean rank (``scipy.stats.rankdata``'s default)."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    bounds = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1], True])
    group = np.cumsum(np.r_[True, xs[1:] != xs[:-1]]) - 1
    mean_rank = (bounds[:-1] + bounds[1:] + 1) / 2.0
    ranks = np.empty_like(x)
    ranks[order] = mean_rank[group]
    return ranks


def auroc(hallucinated, scores) -> float:
    """Area under the ROC curve for detecting ``hallucinated == 1`` with ``scores`` (ties count half)."""
    y, s = _as_arrays(hallucinated, scores)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs both right and wrong answers")
    r = average_ranks(s)
    return float((r[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(hallucinated, scores) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold (from (0, 0) to (1, 1)), for plotting."""
    y, s = _as_arrays(hallucinated, scores)
    order = np.argsort(-s, kind="mergesort")
    ys, ss = y[order], s[order]
    last = np.r_[ss[1:] != ss[:-1], True]  # end of each tie group
    tp = np.cumsum(ys)[last]
    fp = np.cumsum(1 - ys)[last]
    n_pos, n_neg = max(y.sum(), 1), max((1 - y).sum(), 1)
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]


def rejection_accuracy_curve(correct, scores) -> tuple[np.ndarray, np.ndarray]:
    """``(retained fraction k/n, expected accuracy of the k lowest-score answers)`` for ``k = 1 .. n``."""
    c, s = _as_arrays(correct, scores)
    n = c.size
    order = np.argsort(s, kind="mergesort")
    cs, ss = c[order], s[order]
    new = np.r_[True, ss[1:] != ss[:-1]]
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], n]
    group = np.cumsum(new) - 1
    sums = np.add.reduceat(cs, starts)
    before = np.r_[0.0, np.cumsum(sums)[:-1]]  # right answers in the groups before
    mean = sums / (ends - starts)
    k = np.arange(1, n + 1)
    expected = before[group] + (k - starts[group]) * mean[group]
    return k / n, expected / k


def aurac(correct, scores) -> float:
    """Area under the rejection-accuracy curve (mean expected accuracy over ``k = 1 .. n`` kept answers)."""
    return float(rejection_accuracy_curve(correct, scores)[1].mean())


def aurac_oracle(correct) -> float:
    """The best AURAC reachable for these labels (every wrong answer rejected first)."""
    c = np.asarray(correct, dtype=float)
    return aurac(c, -c)


@dataclass(frozen=True)
class Interval:
    point: float
    low: float
    high: float
    n_boot: int  # resamples drawn
    n_valid: int  # resamples where the metric was defined

    def to_dict(self) -> dict:
        return asdict(self)


def _resamples(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def bootstrap_ci(metric: Callable[..., float], *arrays: Sequence, n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0) -> Interval:
    """Percentile bootstrap interval of ``metric(*arrays)``, resampling the rows of all arrays together."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    arrs = [np.asarray(a) for a in arrays]
    n = len(arrs[0])
    if any(len(a) != n for a in arrs):
        raise ValueError("arrays must have the same length")
    point = metric(*arrs)
    vals = []
    for idx in _resamples(n, n_boot, seed):
        try:
            vals.append(metric(*(a[idx] for a in arrs)))
        except ValueError:
            continue
    if not vals:
        raise ValueError("the metric was undefined on every bootstrap resample")
    lo, hi = np.quantile(vals, [alpha / 2, 1 - alpha / 2])
    return Interval(float(point), float(lo), float(hi), n_boot, len(vals))


def bootstrap_diff(metric: Callable[[np.ndarray, np.ndarray], float], labels: Sequence, scores_a: Sequence,
                   scores_b: Sequence, *, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> Interval:
    """Paired bootstrap interval of ``metric(labels, a) - metric(labels, b)`` (same resamples for both)."""
    y, a, b = np.asarray(labels), np.asarray(scores_a), np.asarray(scores_b)
    return bootstrap_ci(lambda y_, a_, b_: metric(y_, a_) - metric(y_, b_), y, a, b, n_boot=n_boot,
                        alpha=alpha, seed=seed)
