"""Model backends for the engine: how a batch of new tokens goes through the model and its KV cache.

``hf``: the model's own forward with a transformers ``StaticCache`` (any causal LM).
``packed-llama``: a lean forward for the Llama family that reads the model's weights repacked once
(q/k/v and gate/up fused, all matrices stored input-major, which MKL's matrix-vector path reads faster),
with its own preallocated KV cache. It costs one extra copy of the weights; it is rebuilt automatically when
any weight or the RoPE frequencies change (tracked through tensor version counters), so model edits are
never served stale. ``auto`` picks ``packed-llama`` when the model qualifies, else ``hf``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workbench.errors import UnknownNameError


def cache_kwarg(model) -> str:
    """The forward's name for the KV cache: transformers renamed ``past_key_values`` to ``cache`` within 5.x,
    and a model's forward takes unknown keywords silently, so passing the wrong one would drop the cache."""
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise TypeError(f"{type(model).__name__}.forward takes neither 'cache' nor 'past_key_values'")


class HFBackend:
    name = "hf"

    def __init__(self, model):
        self.model = model
        self.cache_kwarg = cache_kwarg(model)

    def new_cache(self, batch: int, max_len: int):
        from transformers import StaticCache

        return StaticCache(config=self.model.config, max_cache_len=max_len)

    def forward(self, ids, mask, positions, cache, all_positions: bool = False) -> torch.Tensor:
        """Run ``ids`` [B, T] (mask: [B, cached + T] key validity) and return the last position's logits
        ``[B, V]`` (or every position's, ``[B, T, V]``, with ``all_positions``)."""
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=0 if all_positions else 1, **{self.cache_kwarg: cache})
        return out.logits if all_positions else out.logits[:, -1]

    def reorder(self, cache, index: torch.Tensor) -> None:
        """Keep cache rows ``index`` (beam search), in place."""
        for layer in cache.layers:
            layer.keys.copy_(layer.keys.index_select(0, index))
            layer.values.copy_(layer.values.index_select(0, index))


@dataclass
class _Layer:
    norm1: torch.Tensor
    # weights in nn.Linear's layout [out, in] (the C++ skinny kernel streams their rows)
    wqkv: torch.Tensor  # [(heads + 2 * kv_heads) * head_dim, d]
    bqkv: torch.Tensor | None
    wo: torch.Tensor  # [d, heads * head_dim]
    bo: torch.Tensor | None
    norm2: torch.Tensor
    wgu: torch.Tensor  # [2 * intermediate, d]
    bgu: torch.Tensor | None
    wdown: torch.Tensor  # [d, intermediate]
    bdown: torch.Tensor | None


class KVCache:
    """Preallocated keys/values ``[layers, B, kv_heads, max_len, head_dim]`` filled left to right."""

    def __init__(self, layers, batch, kv_heads, max_len, head_dim, dtype, device):
        shape = (layers, batch, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0
        self.max_len = max_len


def _cat_bias(*mods):
    if all(m.bias is None for m in mods):
        return None
    return torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features, dtype=m.weight.dtype,
                                                                      device=m.weight.device) for m in mods])


class PackedLlamaBackend:
    """Lean Llama-family forward on repacked weights (see module docstring)."""

    name = "packed-llama"
    MODEL_TYPES = ("llama",)
    STATIC_ROPE = ("default", "linear", "llama3", "yarn", "longrope")
    FUSED_MAX_TOKENS = 16  # new tokens per row up to which the native fused loop runs
    SKINNY_MAX_ROWS = 16  # rows up to which the native LM head runs the skinny kernel (as in the C++ file)

    def __init__(self, model, native: bool | None = None):
        """``native``: run the layer loop in the compiled C++ helper (prefill: the same ATen ops, bitwise-equal
        results; decode steps: fused loops around the four weight matmuls, equal within float rounding).
        None = when available (fp32, bias-free layers, helper builds), False = Python."""
        why = self.unsupported(model)
        if why:
            raise ValueError(f"backend 'packed-llama' cannot run this model: {why}")
        self.model = model
        self.native_request = native
        self._fingerprint = None
        self._pack()

    @classmethod
    def unsupported(cls, model) -> str | None:
        cfg = model.config
        if getattr(cfg, "model_type", None) not in cls.MODEL_TYPES:
            return f"model_type {getattr(cfg, 'model_type', None)!r} is not one of {cls.MODEL_TYPES}"
        device = next(model.parameters()).device
        if device.type != "cpu":
            return f"the weights are on {device}; the packed backend runs on CPU"
        rope = getattr(model.model, "rotary_emb", None)
        if rope is None or not hasattr(rope, "inv_freq"):
            return "no rotary embedding with inv_freq found"
        if getattr(rope, "rope_type", "default") not in cls.STATIC_ROPE:
            return f"rope_type {rope.rope_type!r} changes with sequence length"
        if getattr(rope, "_daert_dynamic_rope", False):
            return "a dynamic RoPE scaling hook is active (frequencies change with sequence length)"
        if getattr(cfg, "hidden_act", "silu") != "silu":
            return f"hidden_act {cfg.hidden_act!r} (only silu)"
        if getattr(cfg, "pretraining_tp", 1) != 1:
            return "pretraining_tp != 1"
        return None

    def _current_fingerprint(self):
        tensors = [*self.model.parameters(), self.model.model.rotary_emb.inv_freq]
        return tuple((t.data_ptr(), t._version) for t in tensors) + (float(self.model.model.rotary_emb.attention_scaling),)

    @torch.no_grad()
    def _pack(self) -> None:
        m, cfg = self.model, self.model.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.eps = cfg.rms_norm_eps
        self.layers = []
        for blk in m.model.layers:
            a, p = blk.self_attn, blk.mlp
            self.layers.append(_Layer(
                norm1=blk.input_layernorm.weight,
                wqkv=torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                bqkv=_cat_bias(a.q_proj, a.k_proj, a.v_proj),
                wo=a.o_proj.weight.detach().clone(memory_format=torch.contiguous_format), bo=a.o_proj.bias,
                norm2=blk.post_attention_layernorm.weight,
                wgu=torch.cat([p.gate_proj.weight, p.up_proj.weight]),
                bgu=_cat_bias(p.gate_proj, p.up_proj),
                wdown=p.down_proj.weight.detach().clone(memory_format=torch.contiguous_format), bdown=p.down_proj.bias,
            ))
        self.embed = m.model.embed_tokens.weight
        self.final_norm = m.model.norm.weight
        head = m.get_output_embeddings()
        self.lm_head = head.weight.detach().contiguous()  # [vocab, d]: the model's own tensor when contiguous
        self.lm_bias = head.bias
        rope = m.model.rotary_emb
        self.inv_freq = rope.inv_freq.float().clone()
        self.attention_scaling = float(rope.attention_scaling)
        self.dtype = self.embed.dtype
        self._native_args = tuple([getattr(ly, f) for ly in self.layers]
                                  for f in ("norm1", "wqkv", "wo", "norm2", "wgu", "wdown"))
        self.native = self._native_module()
        self._fingerprint = self._current_fingerprint()

    def _native_module(self):
        if self.native_request is False:
            return None
        biased = any(b is not None for ly in self.layers for b in (ly.bqkv, ly.bo, ly.bgu, ly.bdown))
        why = ("layers have biases" if biased else "weights are not float32" if self.dtype != torch.float32
               else None)
        from workbench.engine import native

        module = None if why else native.load("packed_llama")
        if module is None and self.native_request:
            raise ValueError(f"native packed-llama layers unavailable: {why or native.failure('packed_llama') or 'disabled'}")
        return module

    def refresh(self) -> None:
        """Repack if any weight or the RoPE frequencies changed since the last pack."""
        if self._current_fingerprint() != self._fingerprint:
            self._pack()

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        why = self.unsupported(self.model)
        if why:
            raise ValueError(f"backend 'packed-llama' cannot run this model any more: {why}")
        self.refresh()
        return KVCache(len(self.layers), batch, self.kv_heads, max_len, self.head_dim, self.dtype, self.embed.device)

    def _rms(self, x, w):
        # LlamaRMSNorm in fp32 (bitwise equal); hand-written because aten's rms_norm is slower on CPU here
        if x.dtype == torch.float32:
            return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(self.eps)))
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(self.eps))).to(x.dtype)

    def _rope(self, positions, dtype):
        """cos and a sign-folded sin: ``rotate_half(x) * sin == roll(x, D/2) * cat(-s, s)`` (bitwise equal)."""
        freqs = positions[..., None].float() * self.inv_freq
        cos = torch.cat((freqs, freqs), dim=-1).cos() * self.attention_scaling
        sin = freqs.sin() * self.attention_scaling
        return cos.to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)

    @torch.no_grad()
    def forward(self, ids, mask, positions, cache: KVCache, all_positions: bool = False) -> torch.Tensor:
        B, T = ids.shape
        start, end = cache.length, cache.length + T
        if end > cache.max_len:
            raise ValueError(f"KV cache overflow: {end} > {cache.max_len}")
        if mask.shape != (B, end):
            raise ValueError(f"mask must be [B, cached + new] = {(B, end)}, got {tuple(mask.shape)}")
        H, KV, D = self.heads, self.kv_heads, self.head_dim
        keys_ok = mask.bool()[:, None, None, :]  # [B, 1, 1, end]
        if T > 1:
            q_slot = torch.arange(start, end, device=ids.device)
            causal = torch.arange(end, device=ids.device)[None, :] <= q_slot[:, None]  # [T, end]
            diag = torch.arange(end, device=ids.device)[None, :] == q_slot[:, None]
            attn_mask = (keys_ok & causal) | diag  # padding queries see themselves: no all-masked rows
        else:
            attn_mask = keys_ok
        cos, sin = self._rope(positions, self.dtype)
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, D]
        half = D // 2
        h = F.embedding(ids, self.embed)
        if self.native is not None:
            # a few new tokens per row (decode, verification): the fused loop; its attention is a plain loop,
            # so longer prefills take the ATen loop (bitwise the Python one) and its blocked SDPA
            run = self.native.decode_layers if T <= self.FUSED_MAX_TOKENS else self.native.layers_forward
            h = run(h, *self._native_args, cache.k, cache.v, cos, sin, attn_mask, start, H, KV, D, self.eps)
            cache.length = end
            return self.head(h if all_positions else h[:, -1])
        for i, ly in enumerate(self.layers):
            qkv = self.qkv(ly, h)
            qk = qkv[..., : (H + KV) * D].view(B, T, H + KV, D).transpose(1, 2)
            qk = qk * cos + qk.roll(half, -1) * sin  # RoPE on q and k heads at once
            q, k = qk[:, :H], qk[:, H:]
            cache.k[i, :, :, start:end] = k
            cache.v[i, :, :, start:end] = qkv[..., (H + KV) * D:].view(B, T, KV, D).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, cache.k[i, :, :, :end], cache.v[i, :, :, :end],
                                               attn_mask=attn_mask, scale=D ** -0.5, enable_gqa=H != KV)
            h = self.finish_layer(ly, h, o.transpose(1, 2).reshape(B, T, H * D))
        cache.length = end
        return self.head(h if all_positions else h[:, -1])

    def qkv(self, ly: _Layer, h: torch.Tensor) -> torch.Tensor:
        """Input norm and the fused q/k/v projection of one layer."""
        return F.linear(self._rms(h, ly.norm1), ly.wqkv, ly.bqkv)

    def finish_layer(self, ly: _Layer, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Output projection + residual, then the SwiGLU MLP + residual. ``attn``: [..., heads * head_dim]."""
        h = h + F.linear(attn, ly.wo, ly.bo)
        g, u = F.linear(self._rms(h, ly.norm2), ly.wgu, ly.bgu).chunk(2, dim=-1)
        return h + F.linear(F.silu(g) * u, ly.wdown, ly.bdown)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head."""
        x = self._rms(h, self.final_norm)
        if self.native is not None and self.lm_bias is None and x.numel() // x.shape[-1] <= self.SKINNY_MAX_ROWS:
            # a few rows (decode, verification): the C++ kernel reads the [vocab, d] head once for all rows
            return self.native.skinny_linear(x.reshape(-1, x.shape[-1]), self.lm_head).view(*x.shape[:-1], -1)
        return F.linear(x, self.lm_head, self.lm_bias)

    def reorder(self, cache: KVCache, index: torch.Tensor) -> None:
        cache.k.copy_(cache.k.index_select(1, index))
        cache.v.copy_(cache.v.index_select(1, index))


BACKENDS = {"hf": HFBackend, "packed-llama": PackedLlamaBackend}


def make_backend(model, name="auto"):
    """Build backend ``name`` (exact name, or ``auto``) for ``model``; a backend instance is used as is."""
    if not isinstance(name, str):
        if getattr(name, "model", None) is not model:
            raise ValueError("the backend instance was built for another model")
        return name
    if name == "auto":
        return PackedLlamaBackend(model) if PackedLlamaBackend.unsupported(model) is None else HFBackend(model)
    if name not in BACKENDS:
        raise UnknownNameError("engine backend", name, [*BACKENDS, "auto"])
    return BACKENDS[name](model)
