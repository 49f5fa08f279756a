"""Hyperparameters of the editing methods: one dataclass per method, per-model defaults in JSON files.

A defaults file ``surgery/hparams/<name>.json`` holds a ``"match"`` section (config fields a model must have,
e.g. ``model_type``, ``num_hidden_layers``) and one section per method. Layers are block numbers; keys are
read at ``blocks.{layer}.mlp.hook_post`` and values written at ``blocks.{layer}.hook_mlp_out`` (the only hook
names accepted: the down projection is what the methods rewrite). A model no file matches gets generic
defaults scaled to its depth.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from workbench.errors import UnknownNameError, WorkbenchError

log = logging.getLogger(__name__)

HPARAMS_DIR = Path(__file__).with_name("hparams")
KEY_HOOK = "mlp.hook_post"
VALUE_HOOK = "hook_mlp_out"


class HparamsError(WorkbenchError, ValueError):
    """Hyperparameters that do not fit the model or the method."""


def _check_spread(hp) -> None:
    """``spread_passes`` an integer >= 1 and (AlphaEdit) ``prev_weight`` a finite number >= 0, where present."""
    passes = getattr(hp, "spread_passes", 1)
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise HparamsError(f"{type(hp).__name__}: spread_passes must be an integer >= 1, got {hp.spread_passes!r}")
    w = getattr(hp, "prev_weight", 1.0)
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
        raise HparamsError(f"{type(hp).__name__}: prev_weight must be a finite number >= 0, got {w!r}")


def _check_preserve(hp) -> None:
    """(ROME) ``preserve_subjects`` an integer >= 0 and ``preserve_pool`` None or a list of non-empty strings."""
    n = getattr(hp, "preserve_subjects", 0)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise HparamsError(f"{type(hp).__name__}: preserve_subjects must be an integer >= 0, got {n!r}")
    pool = getattr(hp, "preserve_pool", None)
    if pool is not None and (isinstance(pool, str) or not isinstance(pool, (list, tuple))
                             or not all(isinstance(c, str) and c.strip() and "{}" not in c for c in pool)):
        raise HparamsError(f"{type(hp).__name__}: preserve_pool must be null or a list of non-empty subject strings")


@dataclass
class StatsConfig:
    """Second-moment statistics of MLP keys (see :mod:`workbench.surgery.stats`)."""

    corpus: str = "gcide"
    tokens: int = 100_000
    seq_len: int = 256
    batch_size: int = 8


@dataclass
class ValueOpt:
    """Optimisation of the value vector v* (Meng et al. 2022, section 3.1): a shift δ of the MLP output at the
    subject's last token that makes the target likely over prefixed contexts while keeping the subject's
    "essence" distribution (KL) and δ's norm small."""

    v_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float = 1e-3
    clamp_norm_factor: float = 4.0  # ||δ|| <= factor * ||current MLP output||
    kl_factor: float = 0.0625
    essence_template: str = "{} is a"
    n_prefixes: int = 5  # generated context prefixes (besides the empty one), for keys and values
    prefix_len: int = 10
    stop_loss: float = 5e-2  # stop the optimisation once the target NLL is below this
    seed: int = 0


@dataclass
class ROMEHparams(ValueOpt):
    layer: int = 0
    stats: StatsConfig = field(default_factory=StatsConfig)
    ridge: float = 1e-4  # λ·tr(C)/d added to C before solving, for a well-posed inverse
    # optimise δ through the rank-one update (every position gets (uᵀk) δ) rather than at the subject token only
    value_through_update: bool = False
    # keys of this many other subjects, put in the request's template, held fixed by the update
    # (:mod:`workbench.surgery.preserve`); chosen from preserve_pool (None: the vocabulary's capitalised words)
    preserve_subjects: int = 0
    preserve_pool: list[str] | None = None

    def __post_init__(self):
        _check_preserve(self)

    @property
    def layers(self) -> list[int]:
        return [self.layer]


@dataclass
class SpreadOpt(ValueOpt):
    """The residual spread over a layer range (MEMIT, AlphaEdit; :func:`workbench.surgery.memit.spread_edit`)."""

    spread_passes: int = 1  # sweeps over the layer range, each on the residual the previous ones left

    def __post_init__(self):
        _check_spread(self)


@dataclass
class MEMITHparams(SpreadOpt):
    layers: list[int] = field(default_factory=lambda: [0])
    stats: StatsConfig = field(default_factory=StatsConfig)
    mom2_weight: float = 15_000.0  # λ_C in ΔW = R Kᵀ (λ_C C + K Kᵀ)⁻¹ (Meng et al. 2023, eq. 14)
    ridge: float = 0.0


@dataclass
class AlphaEditHparams(SpreadOpt):
    layers: list[int] = field(default_factory=lambda: [0])
    stats: StatsConfig = field(default_factory=StatsConfig)
    # null space: eigenvectors of C whose eigenvalue is below null_threshold * the largest eigenvalue
    null_threshold: float = 1e-2
    l2: float = 10.0  # α in ΔW = R K₁ᵀ P (P(λ_p K_p K_pᵀ + K₁K₁ᵀ)P + α I)⁻¹ (Fang et al. 2025, eq. 13)
    # λ_p, the weight of the earlier edits' keys: 1 is the paper's form; more guards earlier edits against later
    # batches without shrinking the new ones as a larger α does
    prev_weight: float = 1.0
    ridge: float = 0.0


@dataclass
class FTHparams:
    layer: int = 0
    steps: int = 25
    lr: float = 5e-4
    norm_constraint: float = 5e-4  # |w - w0| <= this, elementwise (Zhu et al. 2020)
    weight_decay: float = 0.0
    stop_loss: float = 1e-2
    seed: int = 0

    @property
    def layers(self) -> list[int]:
        return [self.layer]


HPARAMS: dict[str, type] = {"rome": ROMEHparams, "memit": MEMITHparams, "alphaedit": AlphaEditHparams,
                            "ft": FTHparams}


def _build(cls, d: dict):
    d = dict(d)
    for hook, want in (("key_hook", KEY_HOOK), ("value_hook", VALUE_HOOK)):
        if hook in d and d.pop(hook) != want:
            raise HparamsError(f"{cls.__name__}: {hook} must be {want!r} (the down projection's input/output)")
    names = {f.name for f in dataclasses.fields(cls)}
    extra = sorted(set(d) - names)
    if extra:
        raise HparamsError(f"unknown {cls.__name__} fields {extra}; known: {sorted(names)}")
    if "stats" in d and isinstance(d["stats"], dict):
        d["stats"] = StatsConfig(**d["stats"])
    return cls(**d)


def hparams_from_dict(method: str, d: dict):
    if method not in HPARAMS:
        raise UnknownNameError("editing method", method, list(HPARAMS))
    return _build(HPARAMS[method], d)


def hparams_to_dict(hp) -> dict:
    return dataclasses.asdict(hp)


def _matches(match: dict, config) -> bool:
    return all(getattr(config, k, None) == v for k, v in match.items())


def defaults_file(model) -> Path | None:
    """The defaults file whose ``match`` section fits ``model.config`` (None when none does)."""
    for path in sorted(HPARAMS_DIR.glob("*.json")):
        data = json.loads(path.read_text())
        if _matches(data.get("match", {}), model.config):
            return path
    return None


def generic(method: str, n_layers: int) -> dict:
    """Depth-scaled defaults for a model without a file: early-middle layers (causal tracing, Meng et al. 2022,
    finds factual recall at the subject's last token in early-middle MLPs)."""
    mid = max(0, min(n_layers - 1, round(n_layers * 0.2)))
    span = sorted({max(0, min(n_layers - 1, mid + d)) for d in range(-2, 3)})
    return {"rome": {"layer": mid}, "ft": {"layer": mid}, "memit": {"layers": span},
            "alphaedit": {"layers": span}}[method]


def load_hparams(method: str, model=None, overrides: dict | None = None, path: str | Path | None = None):
    """Hyperparameters for ``method`` and ``model``: the matching defaults file (or ``path``), then ``overrides``."""
    if method not in HPARAMS:
        raise UnknownNameError("editing method", method, list(HPARAMS))
    base: dict = {}
    if path is not None:
        data = json.loads(Path(path).read_text())
        base = data.get(method, data)
    elif model is not None:
        f = defaults_file(model)
        if f is not None:
            base = json.loads(f.read_text()).get(method, {})
            log.info("hyperparameters for %s from %s", method, f.name)
        else:
            base = generic(method, model.config.num_hidden_layers)
    return _build(HPARAMS[method], {**base, **(overrides or {})})


def validate_layers(hp, model) -> None:
    """Every layer of ``hp`` must exist in ``model``, and the spread and preserve fields be valid (checked
    before any weight changes, also for a dataclass changed after it was made)."""
    _check_spread(hp)
    _check_preserve(hp)
    n = model.config.num_hidden_layers
    layers = list(hp.layers)
    if not layers:
        raise HparamsError(f"{type(hp).__name__} names no layer")
    bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < n]
    if bad:
        raise HparamsError(f"{type(hp).__name__}: layers {bad} out of range for a model with {n} layers (0..{n - 1})")
    if len(set(layers)) != len(layers) or layers != sorted(layers):
        raise HparamsError(f"{type(hp).__name__}: layers must be distinct and ascending, got {layers}")
