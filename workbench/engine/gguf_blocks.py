"""Quantized blocks read straight from a GGUF file for the packed backend's ``q4`` format (no re-quantization).

A Llama-family GGUF holds per layer ``blk.{i}.attn_q / attn_k / attn_v / attn_output / ffn_gate / ffn_up /
ffn_down.weight``. llama.cpp's converter stores q and k with their rows permuted for its RoPE layout
(``reshape(heads, 2, rows / heads / 2, cols).swapaxes(1, 2)``); the inverse row order is applied here, block
rows being independent. The packed backend fuses q/k/v and gate/up by stacking rows, as for its fp32 weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from workbench.engine.weights import q4_1_blocks

MATRICES = {"wqkv": ("attn_q", "attn_k", "attn_v"), "wo": ("attn_output",), "wgu": ("ffn_gate", "ffn_up"),
            "wdown": ("ffn_down",)}


def _unpermute_rows(rows: int, heads: int) -> torch.Tensor:
    """Index into GGUF rows giving HF's row order for a q/k matrix of ``rows`` rows over ``heads`` heads."""
    src = torch.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(rows)
    return torch.argsort(src)  # GGUF row j holds HF row src[j], so HF row r is GGUF row argsort(src)[r]


def load_q4_1(path: str | Path) -> dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]:
    """``{(matrix, layer): (stored, dm)}`` of the ``q4`` format (:func:`workbench.engine.weights.dequantize_q4`
    gives the weights) for every packed matrix (``wqkv``, ``wo``, ``wgu``, ``wdown``) whose GGUF tensors are all
    Q4_1, in HF's row order."""
    from gguf import GGMLQuantizationType, GGUFReader

    reader = GGUFReader(str(path))
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    if arch != "llama":  # the q/k permutation undone here is llama.cpp's for this architecture
        raise ValueError(f"GGUF Q4_1 blocks are read from llama-architecture files; {path} is {arch!r}")

    def field(key, default=None):
        f = reader.fields.get(f"{arch}.{key}")
        return int(f.parts[-1][0]) if f is not None else default

    heads, layers = field("attention.head_count"), field("block_count")
    kv_heads = field("attention.head_count_kv", heads)  # absent: no grouped-query attention
    tensors = {t.name: t for t in reader.tensors}
    out = {}
    for i in range(layers):
        for matrix, names in MATRICES.items():
            ts = [tensors.get(f"blk.{i}.{n}.weight") for n in names]
            if any(t is None or t.tensor_type != GGMLQuantizationType.Q4_1 for t in ts):
                continue
            parts = []
            for n, t in zip(names, ts, strict=True):
                cols, rows = (int(s) for s in t.shape)  # GGUF lists the fastest dimension first
                q = q4_1_blocks(torch.from_numpy(t.data.copy()).flatten(), rows, cols)
                if n in ("attn_q", "attn_k"):
                    idx = _unpermute_rows(rows, heads if n == "attn_q" else kv_heads)
                    q = (q[0][idx], q[1][idx])
                parts.append(q)
            out[(matrix, i)] = (torch.cat([p[0] for p in parts]).contiguous(),
                                torch.cat([p[1] for p in parts]).contiguous())
    return out
