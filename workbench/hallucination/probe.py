"""Linear probes on hidden states (SAPLMA, Azaria & Mitchell 2023; semantic-entropy probes, Kossen et al. 2024).

A probe is a logistic regression on the standardised residual stream after one block, at one position of the
greedy generation (``"tbg"``: the last prompt token; ``"slt"``: see
:mod:`workbench.hallucination.generation`). Those states are recorded while the answer is generated, so at
inference the probe costs one dot product. Targets:

- ``hallucinated`` (accuracy probe): 1 for a wrong answer, from labelled generations;
- ``high-semantic-entropy`` (SEP): 1 where the answer's semantic entropy is above the threshold of
  :func:`binarize_entropy` (no correctness labels needed).

:func:`train_probe` picks the layer and the inverse regularisation ``C`` by inner cross-validated AUROC on the
training generations only; :func:`cross_validated_scores` gives out-of-fold scores (each question's score
comes from a probe that never saw it). Probes save to one safetensors file (:meth:`LinearProbe.save`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from workbench.hallucination.generation import POSITIONS
from workbench.hallucination.metrics import auroc

log = logging.getLogger(__name__)
FORMAT = "workbench.hallucination.probe/1"


@dataclass(frozen=True)
class ProbeConfig:
    """``layers``: candidate blocks (None: every recorded one); ``Cs``: candidate inverse L2 strengths."""

    position: str = "tbg"
    layers: tuple[int, ...] | None = None
    Cs: tuple[float, ...] = (0.001, 0.01, 0.1)
    inner_folds: int = 3
    max_iter: int = 5000
    seed: int = 0
    target: str = "hallucinated"

    def __post_init__(self):
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {self.position!r}")
        if not self.Cs or any(c <= 0 for c in self.Cs):
            raise ValueError(f"Cs must be positive, got {self.Cs}")
        if self.inner_folds < 2:
            raise ValueError(f"inner_folds must be >= 2, got {self.inner_folds}")


@dataclass
class LinearProbe:
    """``P(target = 1) = sigmoid(coef . (x - mean) / scale + intercept)`` on ``blocks.{layer}.hook_resid_post``
    at ``position``."""

    position: str
    layer: int
    coef: np.ndarray
    intercept: float
    mean: np.ndarray
    scale: np.ndarray
    C: float = 1.0
    target: str = "hallucinated"
    meta: dict = field(default_factory=dict)

    @classmethod
    def fit(cls, X: np.ndarray, y: Sequence[int], *, position: str, layer: int, C: float = 1.0,
            target: str = "hallucinated", max_iter: int = 5000, meta: dict | None = None) -> LinearProbe:
        from sklearn.linear_model import LogisticRegression

        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y, dtype=int)
        if len(np.unique(y)) != 2:
            raise ValueError("a probe needs both classes in its training labels")
        mean = X.mean(0)
        scale = X.std(0)
        scale[scale == 0] = 1.0
        lr = LogisticRegression(C=C, max_iter=max_iter)
        lr.fit((X - mean) / scale, y)
        return cls(position, int(layer), lr.coef_[0].copy(), float(lr.intercept_[0]), mean, scale, float(C), target,
                   dict(meta or {}))

    def decision(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        return ((X - self.mean) / self.scale) @ self.coef + self.intercept

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Probability of the target class for each row of ``X``."""
        return 1.0 / (1.0 + np.exp(-self.decision(X)))

    def features(self, generations) -> np.ndarray:
        return np.stack([g.feature(self.position, self.layer) for g in generations])

    def score(self, generations) -> np.ndarray:
        return self.predict(self.features(generations))

    def save(self, path: str | Path) -> None:
        from safetensors.numpy import save_file

        meta = {"format": FORMAT, "position": self.position, "layer": str(self.layer), "C": repr(self.C),
                "target": self.target, "intercept": repr(self.intercept), "meta": json.dumps(self.meta)}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file({"coef": self.coef, "mean": self.mean, "scale": self.scale}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> LinearProbe:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not a saved probe (format {meta.get('format')!r}, want {FORMAT!r})")
            arrays = {k: f.get_tensor(k) for k in ("coef", "mean", "scale")}
        return cls(meta["position"], int(meta["layer"]), arrays["coef"], float(meta["intercept"]), arrays["mean"],
                   arrays["scale"], float(meta["C"]), meta["target"], json.loads(meta["meta"]))


class ProbeDetector:
    name = "probe"

    def __init__(self, probe: LinearProbe):
        if probe.target != "hallucinated" and probe.target != "high-semantic-entropy":
            raise ValueError(f"unknown probe target {probe.target!r}")
        self.probe = probe

    def score(self, generations) -> np.ndarray:
        return self.probe.score(generations)


def binarize_entropy(values: Sequence[float]) -> tuple[np.ndarray, float]:
    """Labels (1 = high) and the threshold that splits ``values`` into two groups of least total squared
    deviation (Kossen et al.'s rule for semantic-entropy probe targets)."""
    v = np.sort(np.asarray(values, dtype=float))
    if v.size < 2 or v[0] == v[-1]:
        raise ValueError("need at least two distinct values to binarise")
    best, thr = np.inf, None
    for i in range(1, v.size):
        if v[i] == v[i - 1]:
            continue
        lo, hi = v[:i], v[i:]
        sse = ((lo - lo.mean()) ** 2).sum() + ((hi - hi.mean()) ** 2).sum()
        if sse < best:
            best, thr = sse, (v[i - 1] + v[i]) / 2
    return (np.asarray(values, dtype=float) > thr).astype(int), float(thr)


def _stack(generations, position: str, layers: Sequence[int]) -> np.ndarray:
    """``[n, len(layers), d]``"""
    return np.stack([np.stack([g.feature(position, i) for i in layers]) for g in generations])


def _folds(y: np.ndarray, k: int, seed: int, groups=None):
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    if groups is None:
        return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))
    return list(StratifiedGroupKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y, groups))


def select(X: np.ndarray, y: np.ndarray, layers: Sequence[int], config: ProbeConfig, groups=None
           ) -> tuple[int, float, list[dict]]:
    """Best (layer, C) by inner cross-validated AUROC on ``X [n, len(layers), d]``; with the table."""
    folds = _folds(y, config.inner_folds, config.seed, groups)
    table = []
    for li, layer in enumerate(layers):
        for C in config.Cs:
            oof = np.zeros(len(y))
            for tr, te in folds:
                p = LinearProbe.fit(X[tr, li], y[tr], position=config.position, layer=layer, C=C,
                                    max_iter=config.max_iter)
                oof[te] = p.decision(X[te, li])
            table.append({"layer": int(layer), "C": C, "auroc": auroc(y, oof)})
    best = max(table, key=lambda r: r["auroc"])
    return best["layer"], best["C"], table


def train_probe(generations, labels: Sequence[int], config: ProbeConfig = ProbeConfig(), *, groups=None,
                meta: dict | None = None) -> LinearProbe:
    """Fit a probe on all ``generations``; layer and C chosen by inner cross-validation when there is a choice."""
    y = np.asarray(labels, dtype=int)
    layers = tuple(config.layers) if config.layers is not None else tuple(generations[0].layers)
    X = _stack(generations, config.position, layers)
    if len(layers) == 1 and len(config.Cs) == 1:
        layer, C, table = layers[0], config.Cs[0], []
    else:
        layer, C, table = select(X, y, layers, config, groups)
    m = {**(meta or {}), "n_train": int(len(y)), "n_positive": int(y.sum())}
    if table:
        m["selection"] = {"inner_folds": config.inner_folds, "best_inner_auroc": max(r["auroc"] for r in table)}
    return LinearProbe.fit(X[:, layers.index(layer)], y, position=config.position, layer=layer, C=C,
                           target=config.target, max_iter=config.max_iter, meta=m)


def cross_validated_scores(generations, labels: Sequence[int], config: ProbeConfig = ProbeConfig(), *,
                           folds: int = 5, groups=None) -> tuple[np.ndarray, list[dict]]:
    """Out-of-fold probe probabilities (stratified ``folds``, grouped by ``groups`` when given, e.g. question
    ids), each fold's probe trained and tuned on the other folds only; with each fold's chosen layer and C."""
    y = np.asarray(labels, dtype=int)
    out = np.full(len(y), np.nan)
    info = []
    g_all = None if groups is None else np.asarray(groups)
    for k, (tr, te) in enumerate(_folds(y, folds, config.seed, g_all)):
        probe = train_probe([generations[i] for i in tr], y[tr], config,
                            groups=None if g_all is None else g_all[tr])
        out[te] = probe.score([generations[i] for i in te])
        info.append({"fold": k, "layer": probe.layer, "C": probe.C, "n_train": len(tr), "n_test": len(te)})
        log.info("probe fold %d: layer %d, C %g", k, probe.layer, probe.C)
    return out, info
