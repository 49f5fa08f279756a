"""PEFT LoRA adapter folders read into plain tensors, checked against the base model they will run on.

A PEFT folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``adapter_model.bin``). A LoRA
module adds ``scaling * B @ A @ x`` to a linear layer's output (Hu et al. 2021, "LoRA"), with ``A`` [r, in],
``B`` [out, r] and ``scaling = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA, Kalajdzievski 2023). ``r`` and
``alpha`` may differ per module through ``rank_pattern`` / ``alpha_pattern``. Dropout only acts in training and
is ignored. Everything else PEFT can express that changes the computation (DoRA, trained biases, modules saved
in full, embedding adapters, ...) is refused with the reason, never dropped: a config field outside the known
harmless ones must hold its default (None, False or empty), whatever future PEFT versions add.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from workbench.errors import WorkbenchError


class AdapterError(WorkbenchError, ValueError):
    """An adapter that cannot be read, or cannot run on this base model."""


# adapter_config fields whose non-default values change the computation in ways served LoRA does not have
_REFUSED = {
    "use_dora": (False, None, "DoRA (weight-decomposed LoRA) rescales the merged weight; only plain LoRA runs "
                              "unmerged here"),
    "lora_bias": (False, None, "lora_bias trains a bias on B"),
    "fan_in_fan_out": (False, None, "fan_in_fan_out (Conv1D weights) is for GPT-2-style layers"),
    "modules_to_save": (None, [], "modules_to_save replaces whole modules; they are not low-rank terms"),
    "layer_replication": (None, [], "layer_replication changes the layer stack"),
    "trainable_token_indices": (None, {}, "trainable_token_indices changes embedding rows"),
    "target_parameters": (None, [], "target_parameters adapts raw parameters, not linear modules"),
    "alora_invocation_tokens": (None, [], "activated LoRA (aLoRA) switches on after invocation tokens"),
    "use_qalora": (False, None, "QA-LoRA pools the input"),
    "use_bdlora": (False, None, "block-diagonal LoRA"),
}
# fields that do not change what a trained adapter computes at inference (bookkeeping, which modules and layers
# were adapted, initialisation schemes, dropout), or that are read below (r, alpha, patterns, rsLoRA, bias)
_HARMLESS = {
    "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "corda_config", "eva_config",
    "exclude_modules", "inference_mode", "init_lora_weights", "layers_pattern", "layers_to_transform", "loftq_config",
    "lora_alpha", "lora_dropout", "lora_ga_config", "megatron_config", "megatron_core", "peft_type", "peft_version",
    "qalora_group_size", "r", "rank_pattern", "revision", "target_modules", "task_type", "use_rslora",
}
_KEY_RE = re.compile(r"(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>A|B)(?:\.[^.]+)?\.weight")


@dataclass(frozen=True)
class LoraModule:
    """One adapted linear layer: ``y += scaling * B @ (A @ x)``."""
    a: torch.Tensor  # [r, in_features]
    b: torch.Tensor  # [out_features, r]
    scaling: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass(frozen=True, eq=False)
class LoraAdapter:
    """A LoRA adapter as plain tensors: ``modules`` maps the base model's module paths (``model.layers.0.
    self_attn.q_proj``) to :class:`LoraModule` s. ``fingerprint``: SHA-256 of the config and weight files."""
    name: str
    modules: dict[str, LoraModule]
    fingerprint: str
    path: str | None = None

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    @property
    def nbytes(self) -> int:
        return sum(m.a.nbytes + m.b.nbytes for m in self.modules.values())

    def check(self, model: nn.Module) -> None:
        """Raise :class:`AdapterError` unless every module exists in ``model`` as a linear layer of the shapes the
        adapter was trained on."""
        for path, mod in self.modules.items():
            try:
                lin = model.get_submodule(path)
            except AttributeError:
                raise AdapterError(f"adapter {self.name!r} adapts {path!r}, which this "
                                   f"{model.config.model_type} model does not have") from None
            if not isinstance(lin, nn.Linear):
                raise AdapterError(f"adapter {self.name!r}: {path!r} is a {type(lin).__name__}, not a linear layer")
            if mod.a.shape[1] != lin.in_features or mod.b.shape[0] != lin.out_features:
                raise AdapterError(
                    f"adapter {self.name!r} does not fit this base model: {path} is {lin.in_features} -> "
                    f"{lin.out_features}, the adapter's A/B are {tuple(mod.a.shape)} / {tuple(mod.b.shape)}")


def _pattern_value(pattern: dict, module: str, default):
    """PEFT's rule: a pattern key (a regex) applies to a module whose path ends with it (at a dot boundary)."""
    for key, value in pattern.items():
        if re.fullmatch(rf"(.*\.)?(?:{key})", module):
            return value
    return default


def _read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], list[Path]]:
    st, pt = folder / "adapter_model.safetensors", folder / "adapter_model.bin"
    if st.exists():
        from safetensors.torch import load_file

        return load_file(str(st)), [st]
    if pt.exists():
        return torch.load(pt, map_location="cpu", weights_only=True), [pt]
    raise AdapterError(f"{folder} has no adapter_model.safetensors (or adapter_model.bin)")


def load_adapter(path: str | Path, name: str | None = None) -> LoraAdapter:
    """Read a PEFT LoRA folder (see the module docstring for what is refused). Weights are kept in float32."""
    folder = Path(path)
    cfg_file = folder / "adapter_config.json"
    if not cfg_file.is_file():
        raise AdapterError(f"{folder} is not a PEFT adapter folder (no adapter_config.json)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg_file}: not valid JSON ({e})") from None
    name = name or folder.name
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"adapter {name!r} is a {cfg.get('peft_type')} adapter; only LoRA is supported")
    for key, (*defaults, why) in _REFUSED.items():
        if key in cfg and cfg[key] not in defaults:
            raise AdapterError(f"adapter {name!r} is not supported: {why} ({key}={cfg[key]!r})")
    for key, value in cfg.items():
        if key not in _HARMLESS and key not in _REFUSED and value not in (None, False, [], {}, ""):
            raise AdapterError(f"adapter {name!r} sets {key}={value!r}, which this loader does not know to be "
                               "harmless at inference; refused rather than ignored")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"adapter {name!r} trains biases (bias={cfg['bias']!r}); only bias='none' is supported")
    weights, files = _read_weights(folder)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in weights.items():
        m = _KEY_RE.fullmatch(key)
        if m is None:
            raise AdapterError(f"adapter {name!r} holds {key!r}, which is not a LoRA A/B matrix of a linear layer "
                               "(embedding or magnitude vectors are not supported)")
        pairs.setdefault(m.group("module"), {})[m.group("which")] = t
    if not pairs:
        raise AdapterError(f"adapter {name!r} has no LoRA weights")
    alpha, r_default = cfg.get("lora_alpha", 8), cfg.get("r", 8)
    rank_pat, alpha_pat = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    modules = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"adapter {name!r}: {module} has lora_{''.join(ab)} but not both A and B")
        a, b = ab["A"].float().contiguous(), ab["B"].float().contiguous()
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(f"adapter {name!r}: {module} has A {tuple(a.shape)} and B {tuple(b.shape)}, not "
                               "[r, in] and [out, r]")
        r = a.shape[0]
        want = _pattern_value(rank_pat, module, r_default)
        if want != r:
            raise AdapterError(f"adapter {name!r}: {module} has rank {r} but the config says {want}")
        alpha_m = _pattern_value(alpha_pat, module, alpha)
        scaling = alpha_m / math.sqrt(r) if cfg.get("use_rslora") else alpha_m / r
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterError(f"adapter {name!r}: {module} has non-finite weights")
        modules[module] = LoraModule(a, b, float(scaling))
    digest = hashlib.sha256(cfg_file.read_bytes())
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return LoraAdapter(name, modules, digest.hexdigest(), str(folder))
