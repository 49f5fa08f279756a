"""Write a model as it is in memory (edits included) and its tokenizer as a Hugging Face folder.

The folder is built under a temporary name next to the target and renamed into place once complete: an
error leaves no half-written folder, and ``overwrite=True`` replaces an existing folder only after the new
one is whole.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return SAVE_DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {list(SAVE_DTYPES)} or a torch.dtype") from None


def check_target_dir(directory: Path, overwrite: bool) -> None:
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a folder")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{directory} is not empty; pass overwrite=True to replace it (replaced only once the new folder "
            "is complete)"
        )


@contextmanager
def _config_overrides(config, **values):
    """Set config attributes for the duration of a save, then put the old values back."""
    missing = object()
    old = {k: getattr(config, k, missing) for k in values}
    try:
        for k, v in values.items():
            setattr(config, k, v)
        yield
    finally:
        for k, v in old.items():
            if v is missing:
                delattr(config, k)
            else:
                setattr(config, k, v)


def _set_config_dtype(config_json: Path, dtype: torch.dtype) -> None:
    cfg = json.loads(config_json.read_text())
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    config_json.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _untied_edit(model) -> bool:
    """True if the config ties the embeddings but the two matrices differ in memory (one was edited)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return False
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if emb is None or head is None or emb.weight is head.weight:
        return False
    return not torch.equal(emb.weight, head.weight)


def _check_rope(model) -> None:
    from workbench.arch import ARCHITECTURES, get_module

    spec = ARCHITECTURES.get(getattr(model.config, "model_type", None))
    if spec is None or spec.rotary is None:
        return
    try:
        rotary = get_module(model, spec.rotary)
    except AttributeError:
        return
    if getattr(rotary, "_daert_rope_scaling", None) is not None:
        raise ValueError("a workbench.context RoPE scaling is applied in memory and would not be saved; remove "
                         "it, or set it in config.rope_parameters, before exporting")


def save_hf(model, tokenizer, directory: str | os.PathLike, *, dtype=None, overwrite: bool = False) -> Path:
    """Save ``model`` (config, generation config, safetensors weights) and ``tokenizer`` (tokenizer files and
    chat template) into ``directory``, loadable with ``AutoModelForCausalLM.from_pretrained`` /
    ``AutoTokenizer.from_pretrained``.

    ``dtype``: ``None`` keeps the model's dtype; ``"float32"``, ``"bfloat16"``, ``"float16"`` or a
    ``torch.dtype`` casts the saved weights (the model in memory is not changed). A non-empty existing
    ``directory`` is refused unless ``overwrite=True``.
    """
    directory = Path(directory).expanduser()
    target = _resolve_dtype(dtype)
    check_target_dir(directory, overwrite)
    _check_rope(model)
    directory.parent.mkdir(parents=True, exist_ok=True)

    overrides = {}
    state_dict = None
    if target is not None:
        state_dict = {k: v.detach().to(target) for k, v in model.state_dict().items()}
    if _untied_edit(model):
        # the edit would be lost on reload (lm_head re-tied to the embedding): save both, untied
        logger.warning("config ties the embeddings but lm_head differs from the embedding in memory: saving both "
                       "with tie_word_embeddings=False")
        overrides["tie_word_embeddings"] = False
        if state_dict is None:
            state_dict = {k: v.detach() for k, v in model.state_dict().items()}
        state_dict = {k: v.clone() for k, v in state_dict.items()}  # distinct storages: both get written

    staging = directory.with_name(f".{directory.name}.{os.getpid()}.partial")
    old = directory.with_name(f".{directory.name}.{os.getpid()}.old")
    for leftover in (staging, old):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        with _config_overrides(model.config, **overrides):
            model.save_pretrained(staging, state_dict=state_dict)
        if target is not None:  # save_pretrained records the in-memory dtype, not the saved one
            _set_config_dtype(staging / "config.json", target)
        tokenizer.save_pretrained(staging)
        if directory.exists():
            directory.replace(old)  # kept until the new folder is in place
        staging.replace(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old.exists() and not directory.exists():
            old.replace(directory)
        raise
    shutil.rmtree(old, ignore_errors=True)
    logger.info("saved %s", directory)
    return directory
