"""Bridge to TransformerLens: a ``TransformerBridge`` over a model loaded here, built offline."""

from __future__ import annotations

import copy as _copy
import tempfile

from torch import nn


def to_transformer_lens(model: nn.Module, tokenizer, *, copy: bool = True, name: str | None = None,
                        compatibility_mode: bool = False):
    """Wrap ``model`` in TransformerLens 3's ``TransformerBridge`` (no download: the config and weights
    come from the loaded model). The bridge replaces the model's submodules with its own wrappers, so by
    default it wraps a deep copy and leaves ``model`` untouched; ``copy=False`` saves the memory.
    ``compatibility_mode=True`` calls ``enable_compatibility_mode()`` (HookedTransformer-style processed
    weights, which changes activations by design).
    """
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError as e:  # pragma: no cover - the research extra installs it
        raise ImportError("the TransformerLens bridge needs transformer-lens>=3 (pip install -e .[research])") from e
    target = _copy.deepcopy(model) if copy else model
    label = name or getattr(model.config, "_name_or_path", None) or model.config.model_type
    param = next(model.parameters())
    with tempfile.TemporaryDirectory(prefix="daert-tl-tok-") as folder:
        if tokenizer.bos_token is not None and not tokenizer.init_kwargs.get("name_or_path"):
            # TransformerLens re-loads the tokenizer from its folder; give an in-memory one a folder.
            from transformers import AutoTokenizer

            tokenizer.save_pretrained(folder)
            tokenizer = AutoTokenizer.from_pretrained(folder)
        try:
            bridge = TransformerBridge.boot_transformers(str(label), hf_model=target, tokenizer=tokenizer,
                                                         device=param.device, dtype=param.dtype)
        except Exception as e:
            raise ValueError(f"TransformerLens could not bridge model_type {model.config.model_type!r}: {e}") from e
    if compatibility_mode:
        bridge.enable_compatibility_mode()
    return bridge
