"""LoRA terms for a batch whose rows use different adapters (or none), from the registry's stacked pools.

For a row with slot ``s`` and a module's pool (``a`` [S, r, in], ``bt`` [S, r, out], scaling folded into ``bt``),
the term added to the module's output is ``(x @ a[s].T) @ bt[s]``: a shrink to the rank, then an expand. On CPU
rows are grouped by slot (SGMV-style: one pair of matmuls per adapter in the batch; rows without an adapter cost
nothing); on CUDA the Triton BGMV kernels of :mod:`workbench.kernels.lora` do it in two launches. The packed
backend's fused C++ decode loop has its own BGMV loop over the same pools (``decode_layers_ex``).
"""

from __future__ import annotations

import torch

from workbench.lora.registry import Pool

# the packed backend's fused projections: module kind -> (fused output, which part)
PACKED_KINDS = ("q", "k", "v", "o", "gate", "up", "down")


def add_lora(out: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, pool: Pool, kernel: str = "auto"
             ) -> torch.Tensor:
    """``out += lora(x)`` row by row (in place; ``out`` may be a column slice). ``x``: [B, ..., in], ``out``:
    [B, ..., out_features], ``slots``: [B] (``-1``: no adapter). ``kernel``: on CUDA, ``"auto"`` / ``"triton"``
    run the BGMV kernels, ``"torch"`` the loop over the batch's adapters (the loop always runs on CPU)."""
    if x.shape[0] != slots.numel() or out.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"LoRA terms: x {tuple(x.shape)}, out {tuple(out.shape)} and {slots.numel()} row slots "
                         "do not line up")
    if x.is_cuda and kernel != "torch" and out.is_contiguous():
        from workbench.kernels import lora as kl

        T = x.numel() // (x.shape[0] * x.shape[-1])  # tokens per row
        idx = slots.repeat_interleave(T)
        y = kl.bgmv_shrink(x.reshape(-1, x.shape[-1]), pool.a, idx, impl=kernel)
        kl.bgmv_expand(y, pool.bt, idx, out=out.view(-1, out.shape[-1]), impl=kernel)
        return out
    for s in torch.unique(slots).tolist():
        if s < 0:
            continue
        r = int(pool.ranks[s])
        if r == 0:
            continue
        rows = (slots == s).nonzero().flatten()
        xs = x.index_select(0, rows)
        delta = (xs @ pool.a[s, :r].t()) @ pool.bt[s, :r]
        if rows.numel() == slots.numel():
            out.add_(delta.to(out.dtype))
        else:
            out.index_add_(0, rows, delta.to(out.dtype))
    return out


def packed_paths(spec, n_layers: int) -> set[str]:
    """Module paths the packed backend can add LoRA terms to (q/k/v/o/gate/up/down of every layer)."""
    return {f"{spec.layers}.{i}.{getattr(spec.packed, k)}" for i in range(n_layers) for k in PACKED_KINDS}


_EMPTY = torch.empty(0)


class PackedLora:
    """A batch's LoRA terms in the packed backend's fused layout: ``adder(i)`` for its Python layer loop,
    ``native`` / ``native_layer(i)`` for the C++ decode loop (``decode_layers_ex``)."""

    def __init__(self, tables, rows: torch.Tensor):
        self.groups, self.lists = tables
        self.rows = rows.contiguous()
        self.native = (self.rows, *self.lists)

    @staticmethod
    def tables(registry, backend):
        """Per layer, ``{group: [(pool, first column, last column)]}`` for the fused projections (``qkv``, ``o``,
        ``gu``, ``down``), and the pools as the C++ loop takes them (one entry per layer and kind)."""
        H, KV, D = backend.heads, backend.kv_heads, backend.head_dim
        spec, n = backend.spec, len(backend.layers)
        d, inter = backend.embed.shape[1], backend.layers[0].wdown.shape[1]
        cols = {"q": ("qkv", 0, H * D), "k": ("qkv", H * D, (H + KV) * D), "v": ("qkv", (H + KV) * D, (H + 2 * KV) * D),
                "o": ("o", 0, d), "gate": ("gu", 0, inter), "up": ("gu", inter, 2 * inter), "down": ("down", 0, d)}
        groups: list[dict[str, list]] = [{} for _ in range(n)]
        a_list, bt_list, rank_list = [], [], []
        for i in range(n):
            for kind in PACKED_KINDS:
                pool = registry.pools.get(f"{spec.layers}.{i}.{getattr(spec.packed, kind)}")
                if pool is None:
                    a_list.append(_EMPTY), bt_list.append(_EMPTY), rank_list.append(_EMPTY)
                    continue
                group, c0, c1 = cols[kind]
                groups[i].setdefault(group, []).append((pool, c0, c1))
                a_list.append(pool.a), bt_list.append(pool.bt), rank_list.append(pool.ranks)
        return groups, (a_list, bt_list, rank_list)

    def native_layer(self, i: int) -> tuple:
        k = len(PACKED_KINDS)
        return (self.rows, *(lst[i * k: (i + 1) * k] for lst in self.lists))

    def adder(self, i: int):
        groups = self.groups[i]

        def add(group: str, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            for pool, c0, c1 in groups.get(group, ()):
                add_lora(out[..., c0:c1], x, self.rows, pool)
            return out
        return add
