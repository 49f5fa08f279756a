"""RoPE scaling methods, applied to a loaded model and removable.

Every method only changes the rotary inverse frequencies and the attention factor (a multiplier on cos/sin):

- ``linear`` — position interpolation (Chen et al. 2023): ``inv_freq / factor``.
- ``ntk`` — NTK-aware base change (bloc97, 2023): ``base * factor ** (d / (d - 2))``.
- ``dynamic-ntk`` — the NTK base grows with the current length L beyond the original context C
  (emozilla, 2023): ``base * (factor * L / C - (factor - 1)) ** (d / (d - 2))``, recomputed at every forward.
- ``yarn`` — NTK-by-parts (Peng et al. 2023): interpolate low-frequency dims, keep high-frequency ones, ramp in
  between (``beta_fast`` / ``beta_slow`` rotations over the original context), attention factor
  ``0.1 ln(factor) + 1`` (or the ``mscale`` / ``mscale_all_dim`` ratio, or an explicit value).
- ``llama3`` — Llama 3.1's wavelength bands (``low_freq_factor`` / ``high_freq_factor``).

:func:`apply_rope_scaling` swaps the model's rotary buffer (and, for ``dynamic-ntk``, adds a pre-forward hook)
and returns a handle whose ``remove()`` restores the exact original state; it is also a context manager.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from workbench.arch import ARCHITECTURES
from workbench.errors import UnknownNameError

METHODS = ("none", "linear", "ntk", "dynamic-ntk", "yarn", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    method: str = "none"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None  # None: the model's max_position_embeddings
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    mscale: float | None = None  # yarn (DeepSeek style)
    mscale_all_dim: float | None = None  # yarn
    attention_factor: float | None = None  # yarn: explicit value overrides the formula
    truncate: bool = True  # yarn: round the correction range to whole dims
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3

    def __post_init__(self):
        if self.method not in METHODS:
            raise UnknownNameError("RoPE scaling method", self.method, list(METHODS))
        if not self.factor >= 1.0:
            raise ValueError(f"factor must be >= 1 (context extension), got {self.factor}")
        if self.original_max_position_embeddings is not None and self.original_max_position_embeddings < 1:
            raise ValueError("original_max_position_embeddings must be >= 1")
        if self.method == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
            raise ValueError("llama3 needs high_freq_factor > low_freq_factor > 0")
        if self.method == "yarn" and not self.beta_fast > self.beta_slow > 0:
            raise ValueError("yarn needs beta_fast > beta_slow > 0")


def _base_inv_freq(base: float, dim: int, device=None) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))


def _yarn(s: RopeScaling, base: float, dim: int, original: int, device):
    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if s.attention_factor is not None:
        attn = s.attention_factor
    elif s.mscale and s.mscale_all_dim:
        attn = float(mscale(s.factor, s.mscale) / mscale(s.factor, s.mscale_all_dim))
    else:
        attn = mscale(s.factor)

    def correction_dim(rotations):  # the dim whose wavelength fits `rotations` times in the original context
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(device)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    extrapolate = 1 - ramp  # 1: keep the original frequency (high-frequency dims)
    inv = (1.0 / (s.factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv, attn


def _llama3(s: RopeScaling, base: float, dim: int, original: int, device):
    inv = _base_inv_freq(base, dim, device)
    low_wavelen, high_wavelen = original / s.low_freq_factor, original / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (original / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled), 1.0


def inv_freq_for(s: RopeScaling, base: float, dim: int, original: int, seq_len: int | None = None,
                 device=None) -> tuple[torch.Tensor, float]:
    """``(inv_freq [dim / 2], attention_factor)`` for scaling ``s`` of a RoPE with ``base`` over ``dim`` dims and
    an original context of ``original`` positions; ``seq_len`` is the current length (``dynamic-ntk`` only)."""
    if s.method in ("none",) or (s.factor == 1.0 and s.method in ("linear", "ntk")):
        return _base_inv_freq(base, dim, device), 1.0
    if s.method == "linear":
        return _base_inv_freq(base, dim, device) / s.factor, 1.0
    if s.method == "ntk":
        return _base_inv_freq(base * s.factor ** (dim / (dim - 2)), dim, device), 1.0
    if s.method == "dynamic-ntk":
        length = max(seq_len if seq_len is not None else original, original)
        new_base = base * ((s.factor * length / original) - (s.factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(new_base, dim, device), 1.0
    if s.method == "yarn":
        return _yarn(s, base, dim, original, device)
    return _llama3(s, base, dim, original, device)


def rotary_module(model):
    """The model's rotary-embedding module (its path from :mod:`workbench.arch`), or a clear error."""
    mtype = getattr(model.config, "model_type", None)
    spec = ARCHITECTURES.get(mtype)
    if spec is None or spec.rotary is None or spec.packed is None:
        ok = sorted(t for t, a in ARCHITECTURES.items() if a.rotary and a.packed)
        raise ValueError(f"RoPE scaling supports model types {ok}, not {mtype!r}")
    mod = model.get_submodule(spec.rotary)
    if not hasattr(mod, "inv_freq"):
        raise ValueError(f"{spec.rotary} has no inv_freq buffer")
    if getattr(mod, "rope_type", "default") != "default":
        raise ValueError(f"the model already uses rope_type {mod.rope_type!r}; scale a model with plain RoPE")
    return mod


def rope_geometry(model) -> tuple[float, int, int]:
    """``(base, rotary_dim, max_position_embeddings)`` of a loaded model."""
    cfg = model.config
    params = getattr(cfg, "rope_parameters", None) or {}
    base = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    if base is None:
        raise ValueError("the model config has no rope_theta")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    return float(base), dim, int(cfg.max_position_embeddings)


class RopeScalingHandle:
    """Undo for :func:`apply_rope_scaling`: ``remove()`` (idempotent) or use it as a context manager."""

    def __init__(self, module, saved_inv_freq, saved_scaling, hook):
        self._module, self._inv, self._scaling, self._hook = module, saved_inv_freq, saved_scaling, hook
        self.active = True

    def remove(self) -> None:
        if not self.active:
            return
        if self._hook is not None:
            self._hook.remove()
            del self._module._daert_dynamic_rope
        self._module.register_buffer("inv_freq", self._inv, persistent=False)
        self._module.attention_scaling = self._scaling
        del self._module._daert_rope_scaling
        self.active = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def apply_rope_scaling(model, scaling: RopeScaling) -> RopeScalingHandle:
    """Scale ``model``'s RoPE in place (reversibly). One scaling at a time per model."""
    if not isinstance(scaling, RopeScaling):
        raise TypeError(f"scaling must be a RopeScaling, got {type(scaling).__name__}")
    mod = rotary_module(model)
    if getattr(mod, "_daert_rope_scaling", None) is not None:
        raise RuntimeError("this model already has a RoPE scaling applied; remove() it first")
    base, dim, max_pos = rope_geometry(model)
    original = scaling.original_max_position_embeddings or max_pos
    saved_inv, saved_scaling = mod.inv_freq, mod.attention_scaling
    dev = saved_inv.device
    hook = None
    if scaling.method == "dynamic-ntk":
        cache: dict[int, torch.Tensor] = {}

        def update(module, args, kwargs):
            positions = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
            length = int(positions.max()) + 1 if positions is not None and positions.numel() else original
            length = max(length, original)
            if length not in cache:
                cache.clear()
                cache[length] = inv_freq_for(scaling, base, dim, original, length, dev)[0].to(saved_inv.dtype)
            module.inv_freq.copy_(cache[length])

        mod.register_buffer("inv_freq", saved_inv.clone(), persistent=False)
        hook = mod.register_forward_pre_hook(update, with_kwargs=True)
        mod._daert_dynamic_rope = True
    else:
        inv, attn = inv_freq_for(scaling, base, dim, original, device=dev)
        mod.register_buffer("inv_freq", inv.to(saved_inv.dtype), persistent=False)
        mod.attention_scaling = attn
    mod._daert_rope_scaling = scaling
    return RopeScalingHandle(mod, saved_inv, saved_scaling, hook)
