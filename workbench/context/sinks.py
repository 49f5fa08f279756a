"""Attention sinks (StreamingLLM, Xiao et al. 2023): a bounded KV cache for unbounded generation.

The cache keeps the first ``n_sink`` tokens (the "sinks" that soak up attention mass) and the most recent
``window`` tokens; older tokens are evicted. As in the paper, positions are assigned *within the cache*: keys
are stored before RoPE and rotated at their current cache slot each step, so the model never sees a position
beyond ``n_sink + window + chunk``. ``n_sink=0`` gives the plain sliding-window baseline.

Runs on the packed backend's public layer primitives (:mod:`workbench.engine.backends`: ``rope_tables``,
``qkv_heads``, ``finish_layer``, ``head``), so every Llama-layout family of :mod:`workbench.arch` works; batch 1.
While nothing has been evicted, the logits equal the model's own. It runs no hooks or offsets: with hooks
installed on the model it refuses (use the engine for interventions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workbench.engine.backends import PackedLlamaBackend


@dataclass(frozen=True)
class SinkConfig:
    n_sink: int = 4
    window: int = 1020
    chunk: int = 128  # tokens processed per forward when feeding long inputs

    def __post_init__(self):
        if self.n_sink < 0 or self.window < 1 or self.chunk < 1:
            raise ValueError(f"need n_sink >= 0, window >= 1, chunk >= 1; got {self}")

    @property
    def capacity(self) -> int:
        return self.n_sink + self.window


class StreamingLM:
    """Feed tokens (any number) and generate with a cache that never exceeds ``n_sink + window`` tokens."""

    def __init__(self, model, cfg: SinkConfig = SinkConfig()):
        self.p = PackedLlamaBackend(model)  # raises a clear error for non-Llama models
        self.cfg = cfg
        self.reset()

    def reset(self) -> None:
        p, cap = self.p, self.cfg.capacity + self.cfg.chunk
        shape = (len(p.layers), p.kv_heads, cap, p.head_dim)
        self.k = torch.zeros(shape, dtype=p.dtype, device=p.embed.device)  # keys *before* RoPE
        self.v = torch.zeros(shape, dtype=p.dtype, device=p.embed.device)
        self.length = 0  # tokens in the cache
        self.seen = 0  # tokens fed so far
        self.max_length = 0  # high-water mark of the cache, after eviction

    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [T] -> logits [T, V]; appends to the cache (before eviction)."""
        p, T, n = self.p, ids.shape[0], self.length
        H, KV, D = p.heads, p.kv_heads, p.head_dim
        end = n + T
        slots = torch.arange(end, device=ids.device)
        cos, sin = p.rope_tables(slots[None])  # cache-relative positions 0..end-1
        cos, sin = cos[0], sin[0]  # [end, D]
        causal = slots[None, :] <= slots[n:, None]  # [T, end]
        h = F.embedding(ids[None], p.embed)  # [1, T, d]
        for i, ly in enumerate(p.layers):
            qk, v = p.qkv_heads(ly, h)  # [1, H + KV, T, D], [1, KV, T, D], before RoPE
            q = qk[0, :H]
            self.k[i, :, n:end] = qk[0, H:]
            self.v[i, :, n:end] = v[0]
            keys = self.k[i, :, :end]
            keys = keys * cos + keys.roll(D // 2, -1) * sin
            q = q * cos[n:] + q.roll(D // 2, -1) * sin[n:]
            o = F.scaled_dot_product_attention(q[None], keys[None], self.v[i, :, :end][None], attn_mask=causal,
                                               scale=D ** -0.5, enable_gqa=H != KV)
            h = p.finish_layer(ly, h, o[0].transpose(0, 1).reshape(1, T, H * D))
        self.length = end
        return p.head(h[0])

    def _evict(self) -> None:
        cap, s = self.cfg.capacity, self.cfg.n_sink
        if self.length > cap:
            keep = cap - s  # most recent tokens to keep after the sinks
            src = slice(self.length - keep, self.length)
            self.k[:, :, s:cap] = self.k[:, :, src].clone()
            self.v[:, :, s:cap] = self.v[:, :, src].clone()
            self.length = cap
        self.max_length = max(self.max_length, self.length)

    def feed(self, ids) -> torch.Tensor:
        """Feed token ids (list or 1-D tensor) in chunks; returns the logits at every fed position ``[T, V]``."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.p.embed.device).flatten()
        if ids.numel() == 0:
            raise ValueError("feed() needs at least one token")
        from workbench.interp.hooks import foreign_hooks

        hooked = foreign_hooks(self.p.model)
        if hooked:
            raise ValueError(f"StreamingLM runs no hooks, and the model has hooks on {hooked[:3]}: remove them, "
                             "or generate through workbench.engine.Engine, which honours them")
        self.p.refresh()
        outs = []
        for start in range(0, ids.numel(), self.cfg.chunk):
            outs.append(self._forward(ids[start: start + self.cfg.chunk]))
            self._evict()
            self.seen += min(self.cfg.chunk, ids.numel() - start)
        return torch.cat(outs)

    def generate(self, prompt_ids, max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
        """Greedy continuation of ``prompt_ids``, as long as asked: the cache stays bounded."""
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        logits = self.feed(prompt_ids)[-1]
        out = []
        for _ in range(max_new_tokens):
            tok = int(logits.argmax())
            if tok == eos_token_id:
                break
            out.append(tok)
            logits = self.feed([tok])[-1]
        return out
