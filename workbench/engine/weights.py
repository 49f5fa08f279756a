"""Weight formats of the packed backend: what its decode matmuls stream, kept apart from the model's parameters.

- ``fp32``: the model's own values (the only format for which greedy output equals HF's exactly);
- ``bf16``: bfloat16 (the top 16 bits of each float32, rounded to nearest even);
- ``int8``: symmetric int8 with one float32 scale per output row, ``w ~ q * absmax(row) / 127`` (per-channel
  weight quantization as in LLM.int8()'s weight path, Dettmers et al. 2022, without outlier handling).

:func:`quantize` returns the stored form and its float32 dequantized copy: the C++ skinny kernel streams the stored
form (decode steps), the ATen paths (prefills, more than 16 rows) multiply by the dequantized copy, so both run
the same weights and differ only in float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.errors import UnknownNameError

FORMATS = ("fp32", "bf16", "int8")


@dataclass(frozen=True)
class Quantized:
    stored: torch.Tensor  # what the skinny kernel reads: float32, bfloat16 or int8 [out, in]
    scale: torch.Tensor | None  # int8: float32 [out]
    dequantized: torch.Tensor  # float32 [out, in]: the weights this format computes with


def check_format(name: str) -> str:
    if name not in FORMATS:
        raise UnknownNameError("weight format", name, list(FORMATS))
    return name


@torch.no_grad()
def quantize(w: torch.Tensor, fmt: str) -> Quantized:
    """``w`` [out, in] (float32) in format ``fmt``."""
    check_format(fmt)
    w = w.detach().float().contiguous()
    if fmt == "fp32":
        return Quantized(w, None, w)
    if fmt == "bf16":
        q = w.to(torch.bfloat16).contiguous()
        return Quantized(q, None, q.float())
    scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
    return Quantized(q, scale.contiguous(), q.float() * scale[:, None])


def nbytes(q: Quantized) -> int:
    return q.stored.nbytes + (q.scale.nbytes if q.scale is not None else 0)
