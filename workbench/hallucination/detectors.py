"""Hallucination detectors by exact name, and the two token-level ones.

A detector is an object with ``name`` and ``score(generations) -> np.ndarray``: one float per
:class:`~workbench.hallucination.generation.Generation`, higher for answers more likely hallucinated.
:func:`make_detector` builds one by exact name; what each needs:

==========================  =================================================================================
``token-logprob``           nothing: mean negative log-probability of the generated tokens
``token-entropy``           nothing: entropy of the next-token distributions, ``reduce="max"`` (default) or
                            ``"mean"`` over the answer's steps
``semantic-entropy``        ``engine``, a ``judge`` (default: exact match), a
                            :class:`~workbench.hallucination.semantic.SemanticEntropyConfig`
``semantic-entropy-discrete``  the same, with cluster frequencies instead of likelihoods
``p-true``                  ``engine``, a :class:`~workbench.hallucination.ptrue.PTrueConfig`
``probe``                   a trained :class:`~workbench.hallucination.probe.LinearProbe` (or ``path`` to a
                            saved one)
==========================  =================================================================================

Register more with :func:`register_detector`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from workbench.errors import UnknownNameError


class Detector(Protocol):
    name: str

    def score(self, generations: Sequence) -> np.ndarray: ...


def token_logprob_score(gen) -> float:
    """Mean negative log-probability of the generated tokens (the ending EOS included)."""
    return float(-np.mean(gen.token_logprobs))


def token_entropy_stats(gen) -> tuple[float, float]:
    """``(max, mean)`` entropy (nats) of the answer's next-token distributions."""
    h = np.asarray(gen.token_entropies, dtype=float)
    return float(h.max()), float(h.mean())


@dataclass(frozen=True)
class TokenLogprob:
    name: str = "token-logprob"

    def score(self, generations) -> np.ndarray:
        return np.array([token_logprob_score(g) for g in generations], dtype=float)


@dataclass(frozen=True)
class TokenEntropy:
    reduce: str = "max"
    name: str = "token-entropy"

    def __post_init__(self):
        if self.reduce not in ("max", "mean"):
            raise ValueError(f"reduce must be 'max' or 'mean', got {self.reduce!r}")

    def score(self, generations) -> np.ndarray:
        k = 0 if self.reduce == "max" else 1
        return np.array([token_entropy_stats(g)[k] for g in generations], dtype=float)


def _semantic(discrete: bool):
    def build(*, engine, judge=None, config=None):
        from workbench.hallucination.semantic import SemanticEntropy, SemanticEntropyConfig

        cfg = config if config is not None else SemanticEntropyConfig()
        return SemanticEntropy(engine, judge, cfg, discrete=discrete)
    return build


def _ptrue(*, engine, config=None):
    from workbench.hallucination.ptrue import PTrue, PTrueConfig

    return PTrue(engine, config if config is not None else PTrueConfig())


def _probe(*, probe=None, path=None):
    from workbench.hallucination.probe import LinearProbe, ProbeDetector

    if (probe is None) == (path is None):
        raise ValueError("the probe detector takes a trained LinearProbe (probe=) or a saved one (path=)")
    return ProbeDetector(probe if probe is not None else LinearProbe.load(path))


DETECTORS: dict[str, Callable[..., Detector]] = {
    "token-logprob": lambda: TokenLogprob(),
    "token-entropy": lambda reduce="max": TokenEntropy(reduce),
    "semantic-entropy": _semantic(False),
    "semantic-entropy-discrete": _semantic(True),
    "p-true": _ptrue,
    "probe": _probe,
}


def detector_names() -> list[str]:
    return list(DETECTORS)


def make_detector(name: str, **kwargs) -> Detector:
    """Build the detector registered under exactly ``name`` (keyword arguments as in the module table)."""
    if name not in DETECTORS:
        raise UnknownNameError("detector", name, list(DETECTORS))
    return DETECTORS[name](**kwargs)


def register_detector(name: str, factory: Callable[..., Detector], *, replace: bool = False) -> None:
    if not name or not isinstance(name, str):
        raise ValueError("detector name must be a non-empty string")
    if name in DETECTORS and not replace:
        raise ValueError(f"detector {name!r} is already registered (pass replace=True to override)")
    if not callable(factory):
        raise TypeError("a detector factory must be callable")
    DETECTORS[name] = factory
