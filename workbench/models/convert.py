"""GGUF -> fp32 safetensors conversion (done once per model; the result reloads in a fraction of a second)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def gguf_to_safetensors(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize ``gguf_path`` with transformers' GGUF reader and save an fp32 HF folder in ``out_dir``.

    transformers marks a GGUF-loaded model as quantized; the weights are already dequantized in memory,
    so the quantizer and ``quantization_config`` are dropped before saving a plain checkpoint.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("dequantizing %s to fp32 safetensors", gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = out_dir.name
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
