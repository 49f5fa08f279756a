"""Model backends for the engine: how a batch of new tokens goes through the model and its KV cache.

``hf``: the model's own forward with a transformers ``StaticCache`` (any causal LM; every hook point).
``packed-llama``: a lean forward for the Llama-layout families of :mod:`workbench.arch` that reads the model's
weights repacked once (q/k/v and gate/up fused), with its own preallocated KV cache. It costs one extra copy of
the layer weights; it is rebuilt automatically when any weight or the RoPE frequencies change (tracked through
tensor version counters), so model edits are never served stale. ``auto`` picks ``packed-llama`` when the model
qualifies, else ``hf``.

Every backend takes the interventions of :mod:`workbench.engine.interventions` with each forward
(``applied``) and either runs them exactly or says why not (``unsupported_interventions``); the engine then
switches (``auto``) or raises (an explicit backend). Caches can be reordered (beams) and truncated (prefix
reuse) on both.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workbench.arch import ARCHITECTURES, arch_of, get_module
from workbench.errors import UnknownNameError


def cache_kwarg(model) -> str:
    """The forward's name for the KV cache: transformers renamed ``past_key_values`` to ``cache`` within 5.x,
    and a model's forward takes unknown keywords silently, so passing the wrong one would drop the cache."""
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise TypeError(f"{type(model).__name__}.forward takes neither 'cache' nor 'past_key_values'")


class HFCache:
    """A transformers ``StaticCache`` plus the number of slots filled (the engine's view of it)."""

    def __init__(self, cache, max_len: int):
        self.cache = cache
        self.max_len = max_len
        self.length = 0


class HFBackend:
    """The model's own forward: runs every hook point and every model family; interventions are installed as
    ``workbench.interp.Hooks`` around each forward and removed afterwards."""

    name = "hf"

    def __init__(self, model):
        self.model = model
        self.cache_kwarg = cache_kwarg(model)

    def unsupported_interventions(self, applied) -> str | None:
        return None

    def max_cache_len(self) -> int | None:
        return None

    def new_cache(self, batch: int, max_len: int) -> HFCache:
        from transformers import StaticCache

        return HFCache(StaticCache(config=self.model.config, max_cache_len=max_len), max_len)

    @torch.no_grad()
    def forward(self, ids, mask, positions, cache: HFCache, all_positions: bool = False,
                applied=None) -> torch.Tensor:
        """Run ``ids`` [B, T] (mask: [B, cached + T] key validity) and return the last position's logits
        ``[B, V]`` (or every position's, ``[B, T, V]``, with ``all_positions``)."""
        end = cache.length + ids.shape[1]
        if end > cache.max_len:
            raise ValueError(f"KV cache overflow: {end} > {cache.max_len}")
        context = applied.hf_context() if applied is not None else None
        kw = dict(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                  logits_to_keep=0 if all_positions else 1, **{self.cache_kwarg: cache.cache})
        with contextlib.ExitStack() as stack:
            if context is not None:
                stack.enter_context(context)
            if applied is not None and applied.lora is not None:
                stack.enter_context(_lora_hooks(self.model, applied.lora))
            out = self.model(**kw)
        cache.length = end
        return out.logits if all_positions else out.logits[:, -1]

    @torch.no_grad()
    def reorder(self, cache: HFCache, index: torch.Tensor) -> None:
        """Keep cache rows ``index`` (beam search), in place."""
        for layer in cache.cache.layers:
            if getattr(layer, "is_initialized", True):
                layer.keys.copy_(layer.keys.index_select(0, index))
                layer.values.copy_(layer.values.index_select(0, index))

    def inexact_rollback(self, cache: HFCache) -> str | None:
        """Sliding-window layers longer than their window evict by slot: masked or truncated slots would still
        push real keys out."""
        for layer in cache.cache.layers:
            if not getattr(layer, "is_croppable", True) or not hasattr(layer, "crop"):
                return (f"{type(layer).__name__} layers cannot drop slots (a sliding window shorter than the "
                        f"{cache.max_len} cache slots)")
        return None

    def kv(self, cache: HFCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's keys and values ``[B, kv_heads, slots, head_dim]`` (views into the cache)."""
        layers = cache.cache.layers
        if not all(getattr(ly, "is_initialized", False) for ly in layers):
            raise ValueError("the cache has not been filled yet")
        return [(ly.keys, ly.values) for ly in layers]

    def empty_like(self, cache: HFCache, batch: int, max_len: int) -> HFCache:
        """A zeroed cache of ``batch`` rows and ``max_len`` slots, laid out like ``cache``."""
        out = self.new_cache(batch, max_len)
        for src, dst in zip(cache.cache.layers, out.cache.layers, strict=True):
            # the layer allocates its [batch, heads, max_len, dim] tensors from one sample step's shape
            dst.lazy_initialization(src.keys[:1, :, :1].expand(batch, -1, -1, -1),
                                    src.values[:1, :, :1].expand(batch, -1, -1, -1))
        return out

    def set_length(self, cache: HFCache, length: int) -> None:
        """Slots ``[0, length)`` are filled: the next forward writes from ``length`` on."""
        for layer in cache.cache.layers:
            if getattr(layer, "is_initialized", True):
                layer.cumulative_length.fill_(length)
        cache.length = length

    @torch.no_grad()
    def truncate(self, cache: HFCache, length: int) -> None:
        """Forget slots from ``length`` on (the next forward overwrites them)."""
        drop = cache.length - length
        if drop > 0:
            for layer in cache.cache.layers:
                if getattr(layer, "is_initialized", True):
                    layer.crop(-drop)
        cache.length = length


@contextlib.contextmanager
def _lora_hooks(model, lora):
    """Forward hooks adding each row's LoRA terms to the adapted modules' outputs, removed on exit."""
    from workbench.lora.compute import add_lora

    handles = []
    try:
        for path in lora.modules():
            pool = lora.registry.pools[path]

            def hook(_mod, args, out, pool=pool):
                return add_lora(out, args[0], lora.rows, pool, lora.registry.kernel)

            handles.append(model.get_submodule(path).register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


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
    qk_norm: torch.Tensor | None = None  # [heads + kv_heads, 1, head_dim]: per-head q/k RMSNorm weights (Qwen3)
    # prefill="onednn": the matrices prefills multiply by, reordered once for oneDNN's GEMM, by name
    prepacked: dict | None = None


def _linear(ly: _Layer, name: str, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + b`` for matrix ``name`` of ``ly``: through its oneDNN-prepacked copy when it has one (the same
    values; ``prefill="onednn"``), else ``F.linear`` (bitwise HF's, fp32)."""
    packed = ly.prepacked.get(name) if ly.prepacked else None  # biased matrices are never prepacked
    if packed is None:
        return F.linear(x, getattr(ly, name), bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


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


STATIC_ROPE = ("default", "linear", "llama3", "yarn", "longrope")  # rope types whose inv_freq is fixed once built


def rope_refusal(rope, allowed: tuple[str, ...] = STATIC_ROPE) -> str | None:
    """Why rotary module ``rope`` does not compute with fixed frequencies (None: it does): a ``rope_type`` outside
    ``allowed`` (exact names), or a dynamic scaling hook of :mod:`workbench.context.rope_scaling`."""
    kind = getattr(rope, "rope_type", "default")
    if kind not in allowed:
        return f"rope_type {kind!r} changes with sequence length"
    if getattr(rope, "_daert_dynamic_rope", False):
        return "a dynamic RoPE scaling hook is active (frequencies change with sequence length)"
    return None


def _no_lora(_group, out, _x):
    return out


# hook points the fused native loop runs between its layers; every other one (but the pattern) takes the
# Python layer loop
_NATIVE_KINDS = frozenset({"hook_embed", "hook_resid_pre", "hook_resid_post", "ln_final.hook_normalized"})
_PACKED_UNSUPPORTED = frozenset({"attn.hook_pattern"})  # exists only in the model's eager attention


class PackedLlamaBackend:
    """Lean Llama-layout forward on repacked weights (see module docstring).

    Runs every family whose :class:`workbench.arch.ArchSpec` has a ``packed`` layout (Llama, Mistral, Qwen2,
    Qwen3), or says why not. Its layer primitives (:meth:`rope_tables`, :meth:`qkv_heads`, :meth:`finish_layer`,
    :meth:`head`) are public for forwards with their own cache policy (attention sinks).
    """

    name = "packed-llama"
    FUSED_MAX_TOKENS = 16  # new tokens per row up to which the native fused loop runs
    SKINNY_MAX_ROWS = 16  # rows up to which the native LM head runs the skinny kernel (as in the C++ file)

    def __init__(self, model, native: bool | None = None, weights: str = "fp32", gguf=None,
                 activations: str = "fp32", prefill: str | None = None):
        """``native``: run the layer loop in the compiled C++ helper (prefill: the same ATen ops, bitwise-equal
        results; decode steps: fused loops around the four weight matmuls, equal within float rounding).
        None = when available (fp32, bias-free layers without q/k norms, helper builds), False = Python.
        ``weights``: the format the layer matmuls and the LM head compute with (:mod:`workbench.engine.weights`:
        ``fp32``, ``bf16``, ``fp16``, ``int8``, ``q4``); a copy, re-made whenever the model's weights change.
        ``gguf``: a GGUF file whose Q4_1 blocks ``q4`` takes as they are for every matrix they still equal
        (the rest are quantized from the model's weights; ``weights_from`` counts both).
        ``activations="q8"`` (int8 and q4 weights): the C++ decode loop's matmuls (steps of up to 16 rows in
        all, and the LM head on them) quantize their inputs to int8 blocks of 32 and use integer dot products, as
        llama.cpp does; the inputs' rounding is added to the weights'. Longer prefills, more rows and the Python
        loop (hooks inside attention) compute with float32 activations. Refused where the C++ loop is unavailable.
        ``activations="bf16"`` (bf16 weights): the same steps round their inputs to bfloat16 (AVX-512 BF16 dot
        products where the build has them); same scope and refusal.
        ``prefill``: the GEMM of prefills past the fused loop (:data:`workbench.engine.weights.PREFILLS`): ``aten``
        (F.linear; in fp32 HF's own call, so prefill logits are HF's bits) or ``onednn`` (copies reordered once for
        oneDNN: faster, its own float rounding, one more float32 copy of the layer matrices). None: ``aten`` for
        fp32, ``onednn`` for the other formats."""
        from workbench.engine.weights import check_activations, check_format, resolve_prefill

        why = self.unsupported(model)
        if why:
            raise ValueError(f"backend 'packed-llama' cannot run this model: {why}")
        self.weights = check_format(weights)
        self.activations = check_activations(activations, weights)
        self.prefill = resolve_prefill(prefill, weights)
        if weights != "fp32" and next(model.parameters()).dtype != torch.float32:
            raise ValueError(f"weights={weights!r} quantizes float32 models; this one is "
                             f"{next(model.parameters()).dtype}")
        if gguf is not None and weights != "q4":
            raise ValueError(f"gguf= supplies Q4_1 blocks for weights='q4', not weights={weights!r}")
        self.model = model
        self.spec = arch_of(model)
        self.native_request = native
        self._gguf_blocks = None
        if gguf is not None:
            from workbench.engine.gguf_blocks import load_q4_1

            self._gguf_blocks = load_q4_1(gguf)
        self.weights_from = {}
        self._fingerprint = None
        if self.activations == "q8":
            self._check_q8_shapes(model)
        self._pack()
        if self.activations != "fp32" and self.native is None:
            from workbench.engine import native as native_mod

            raise ValueError(f"activations={self.activations!r} runs in the C++ decode loop, which is unavailable here: "
                             f"{native_mod.failure('packed_llama') or 'native=False, disabled or unsupported layers'}")

    def _check_q8_shapes(self, model) -> None:
        """q8 activations come in blocks of 32: every matmul input size must be a multiple of 32."""
        from workbench.engine.weights import Q4_BLOCK

        cfg = model.config
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        inputs = {cfg.hidden_size, heads * head_dim, cfg.intermediate_size}
        bad = sorted(k for k in inputs if k % Q4_BLOCK)
        if bad:
            raise ValueError(f"activations='q8' needs matmul inputs in whole blocks of {Q4_BLOCK}; this model has "
                             f"inputs of {bad}")

    @classmethod
    def unsupported(cls, model) -> str | None:
        cfg = model.config
        mtype = getattr(cfg, "model_type", None)
        spec = ARCHITECTURES.get(mtype)
        if spec is None:
            return f"model_type {mtype!r} is not in the architecture table ({sorted(ARCHITECTURES)})"
        if spec.packed is None:
            return f"model_type {mtype!r}: {spec.packed_refusal}"
        device = next(model.parameters()).device
        if device.type != "cpu":
            return f"the weights are on {device}; the packed backend runs on CPU"
        rope = get_module(model, spec.rotary) if spec.rotary else None
        if getattr(rope, "inv_freq", None) is None:
            return "no rotary embedding with inv_freq found"
        why = rope_refusal(rope)
        if why:
            return why
        if getattr(cfg, "hidden_act", "silu") != "silu":
            return f"hidden_act {cfg.hidden_act!r} (only silu)"
        if getattr(cfg, "pretraining_tp", 1) != 1:
            return "pretraining_tp != 1"
        sliding = [t for t in (getattr(cfg, "layer_types", None) or []) if t != "full_attention"]
        if sliding:
            return "sliding-window attention layers (the packed forward attends to the whole cache)"
        return None

    def max_cache_len(self) -> int | None:
        """Longest sequence this backend computes exactly: a Mistral-style ``sliding_window`` (set on every layer)
        only starts to matter past its length; None = no limit."""
        if self.model.config.model_type == "mistral":
            return getattr(self.model.config, "sliding_window", None)
        return None

    def unsupported_interventions(self, applied) -> str | None:
        """Why this backend cannot run ``applied`` exactly (None: it can)."""
        if applied is None:
            return None
        if applied.foreign:
            from workbench.engine.interventions import describe

            return (f"torch hooks on {describe(applied.foreign)} that were not installed through "
                    "workbench.interp.Hooks or Engine.intervene")
        if applied.kinds & _PACKED_UNSUPPORTED:
            from workbench.engine.interventions import describe

            bad = {n for n in applied.names if n.endswith(tuple(_PACKED_UNSUPPORTED))}
            return f"attention patterns ({describe(bad)}) exist only in the model's eager attention"
        if applied.lora is not None:
            from workbench.engine.interventions import describe
            from workbench.lora.compute import packed_paths

            bad = set(applied.lora.modules()) - packed_paths(self.spec, len(self.layers))
            if bad:
                return f"LoRA adapters on {describe(bad)}, which the packed layout has no place for"
        return None

    def _current_fingerprint(self):
        rope = get_module(self.model, self.spec.rotary)
        tensors = [*self.model.parameters(), rope.inv_freq]
        return tuple((t.data_ptr(), t._version) for t in tensors) + (float(rope.attention_scaling),)

    @torch.no_grad()
    def _pack(self) -> None:
        m, cfg, lay = self.model, self.model.config, self.spec.packed
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.eps = cfg.rms_norm_eps
        self.layers = []
        for blk in get_module(m, self.spec.layers):
            q, k, v, o = (get_module(blk, p) for p in (lay.q, lay.k, lay.v, lay.o))
            gate, up, down = (get_module(blk, p) for p in (lay.gate, lay.up, lay.down))
            qk_norm = None
            if lay.q_norm:
                qn, kn = get_module(blk, lay.q_norm).weight, get_module(blk, lay.k_norm).weight
                qk_norm = torch.cat([qn.expand(self.heads, -1), kn.expand(self.kv_heads, -1)])[:, None]
            self.layers.append(_Layer(
                norm1=get_module(blk, lay.input_norm).weight,
                wqkv=torch.cat([q.weight, k.weight, v.weight]), bqkv=_cat_bias(q, k, v),
                wo=o.weight.detach(), bo=o.bias,  # wo, wdown: copied by _to_huge_pages or _quantize
                norm2=get_module(blk, lay.post_norm).weight,
                wgu=torch.cat([gate.weight, up.weight]), bgu=_cat_bias(gate, up),
                wdown=down.weight.detach(), bdown=down.bias,
                qk_norm=qk_norm,
            ))
        self.embed = get_module(m, self.spec.embed).weight
        self.final_norm = get_module(m, self.spec.final_norm).weight
        head = m.get_output_embeddings()
        self.lm_head = head.weight.detach().contiguous()  # [vocab, d]: the model's own tensor when contiguous
        self.lm_bias = head.bias
        self._quantize()
        self._to_huge_pages()
        self._prepack()
        rope = get_module(m, self.spec.rotary)
        self.inv_freq = rope.inv_freq.float().clone()
        self.attention_scaling = float(rope.attention_scaling)
        self.dtype = self.embed.dtype
        self._native_args = tuple([getattr(ly, f) for ly in self.layers]
                                  for f in ("norm1", "wqkv", "wo", "norm2", "wgu", "wdown"))
        self._native_layer_args = [tuple([a[i]] for a in self._native_args) for i in range(len(self.layers))]
        if self._q_args is not None:  # the skinny kernel's arguments: the stored low-precision matrices
            n1, _, _, n2, _, _ = self._native_args
            wqkv, wo, wgu, wdown = self._q_args
            self._native_q = (n1, wqkv, wo, n2, wgu, wdown)
            self._native_q_layer = [tuple([a[i]] for a in self._native_q) for i in range(len(self.layers))]
        self.native = self._native_module()
        self._fingerprint = self._current_fingerprint()

    def _quantize(self) -> None:
        """Low-precision copies of the layer matrices and the LM head (``weights`` != fp32): the stored forms for
        the skinny kernel (``_q_args``, ``_q_scales``, ``lm_head_q``), the dequantized float32 copies in place of
        the fp32 ones for everything else."""
        self._q_args, self._q_scales, self.lm_head_q = None, [], None
        if self.weights == "fp32":
            return
        from workbench.engine.weights import Quantized, dequantize_q4, kernel_args, quantize

        names = ("wqkv", "wo", "wgu", "wdown")
        stored = {n: [] for n in names}
        self.weights_from = {"gguf": 0, "quantized": 0}
        for i, ly in enumerate(self.layers):
            for n in names:
                w, q = getattr(ly, n), None
                block = (self._gguf_blocks or {}).get((n, i))
                if block is not None:
                    deq = dequantize_q4(*block)
                    if deq.shape == w.shape and torch.equal(deq, w):  # not edited since the file
                        q = Quantized(block[0], block[1], deq)
                self.weights_from["gguf" if q is not None else "quantized"] += 1
                q = q or quantize(w, self.weights)
                setattr(ly, n, q.dequantized)
                w_k, scale = kernel_args(q)
                stored[n].append(w_k)
                if scale is not None:
                    self._q_scales.append(scale)
        self._q_args = tuple(stored[n] for n in names)
        if self._gguf_blocks is not None and self._fingerprint is None and self.weights_from["gguf"] == 0:
            raise ValueError("none of the GGUF file's Q4_1 blocks equals this model's weights (another model, "
                             "or not a Q4_1 file): leave out gguf= to quantize from the model")
        # the LM head stays 8-bit under q4, as llama.cpp's 4-bit files keep their output matrix at 6-8 bits
        q = quantize(self.lm_head, "int8" if self.weights == "q4" else self.weights)
        self.lm_head, self.lm_head_q, self.lm_head_s = q.dequantized, q.stored, q.scale

    def _prepack(self) -> None:
        """``prefill="onednn"``: the layer matrices prefills multiply by (fp32, or the dequantized copies) reordered
        once for oneDNN's GEMM, which runs a 41-token SmolLM2 prefill ~1.4x as fast as F.linear on a 2-core AVX2
        EPYC."""
        if self.prefill != "onednn":
            return
        bias = {"wqkv": "bqkv", "wo": "bo", "wgu": "bgu", "wdown": "bdown"}
        for ly in self.layers:  # biased matrices keep F.linear
            ly.prepacked = {n: torch.ops.mkldnn._reorder_linear_weight(getattr(ly, n), 64) for n in bias
                            if getattr(ly, bias[n]) is None}

    def _to_huge_pages(self) -> None:
        """Move the matrices the skinny kernel streams (the layers' and the LM head's, in the format it reads) into
        one arena on 2 MiB pages (:mod:`workbench.engine.hugepages`); ``huge_pages``: whether the OS was asked."""
        from workbench.engine import hugepages

        names = ("wqkv", "wo", "wgu", "wdown")
        if self._q_args is None:
            slots = [(ly, n) for ly in self.layers for n in names]
            moved, self.huge_pages = hugepages.copies([getattr(ly, n) for ly, n in slots] + [self.lm_head])
            for (ly, n), w in zip(slots, moved, strict=False):  # the last one is the LM head's
                setattr(ly, n, w)
            self.lm_head = moved[-1]
            return
        per = len(self.layers)
        moved, self.huge_pages = hugepages.copies([w for group in self._q_args for w in group] + [self.lm_head_q])
        self._q_args = tuple(moved[g * per:(g + 1) * per] for g in range(len(names)))
        self.lm_head_q = moved[-1]

    def _native_module(self):
        if self.native_request is False:
            return None
        biased = any(b is not None for ly in self.layers for b in (ly.bqkv, ly.bo, ly.bgu, ly.bdown))
        why = ("layers have biases" if biased else "weights are not float32" if self.dtype != torch.float32
               else "layers have q/k norms" if self.layers[0].qk_norm is not None else None)
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
        limit = self.max_cache_len()
        if not why and limit is not None and max_len > limit:
            why = f"{max_len} cache slots exceed the sliding window of {limit}"
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

    def rope_tables(self, positions: torch.Tensor, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and a sign-folded sin for ``positions`` (``[..., T]`` -> ``[..., T, head_dim]``), such that
        ``x * cos + x.roll(head_dim // 2, -1) * sin`` is RoPE (``rotate_half(x) * sin == roll(x, D/2) * cat(-s,
        s)``, bitwise equal to HF)."""
        dtype = dtype or self.dtype
        freqs = positions[..., None].float() * self.inv_freq
        cos = torch.cat((freqs, freqs), dim=-1).cos() * self.attention_scaling
        sin = freqs.sin() * self.attention_scaling
        return cos.to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)

    def qkv_heads(self, ly: _Layer, h: torch.Tensor, add=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Input norm, fused q/k/v projection (``add``: LoRA terms, as in :meth:`finish_layer`) and (Qwen3)
        per-head q/k norms, before RoPE: ``(qk [B, heads + kv_heads, T, D], v [B, kv_heads, T, D])``."""
        B, T = h.shape[:2]
        H, KV, D = self.heads, self.kv_heads, self.head_dim
        x = self._rms(h, ly.norm1)
        qkv = _linear(ly, "wqkv", x, ly.bqkv)
        if add is not None:
            qkv = add("qkv", qkv, x)
        qk = qkv[..., : (H + KV) * D].view(B, T, H + KV, D).transpose(1, 2)
        if ly.qk_norm is not None:
            qk = self._rms(qk, ly.qk_norm)
        return qk, qkv[..., (H + KV) * D:].view(B, T, KV, D).transpose(1, 2)

    @torch.no_grad()
    def forward(self, ids, mask, positions, cache: KVCache, all_positions: bool = False,
                applied=None) -> torch.Tensor:
        B, T = ids.shape
        start, end = cache.length, cache.length + T
        if end > cache.max_len:
            raise ValueError(f"KV cache overflow: {end} > {cache.max_len}")
        if mask.shape != (B, end):
            raise ValueError(f"mask must be [B, cached + new] = {(B, end)}, got {tuple(mask.shape)}")
        why = self.unsupported_interventions(applied)
        if why:
            raise ValueError(f"backend 'packed-llama' cannot run these interventions: {why}")
        iv = applied if applied else None
        lora = self._lora(applied)
        keys_ok = mask.bool()[:, None, None, :]  # [B, 1, 1, end]
        if T > 1:
            q_slot = torch.arange(start, end, device=ids.device)
            causal = torch.arange(end, device=ids.device)[None, :] <= q_slot[:, None]  # [T, end]
            diag = torch.arange(end, device=ids.device)[None, :] == q_slot[:, None]
            attn_mask = (keys_ok & causal) | diag  # padding queries see themselves: no all-masked rows
        else:
            attn_mask = keys_ok
        cos, sin = self.rope_tables(positions, self.dtype)
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, D]
        h = F.embedding(ids, self.embed)
        if iv is not None:
            h = iv.apply("hook_embed", None, "hook_embed", h)
        fused = T <= self.FUSED_MAX_TOKENS
        prepacked = not fused and self.layers[0].prepacked is not None  # prefill on oneDNN: the Python loop
        if self.native is not None and not prepacked and (iv is None or iv.kinds <= _NATIVE_KINDS) and \
                (lora is None or fused):
            # a few new tokens per row (decode, verification): the fused loop; its attention is a plain loop,
            # so longer prefills take the ATen loop (bitwise the Python one) and its blocked SDPA
            low = self._q_args is not None and fused and B * T <= self.SKINNY_MAX_ROWS  # the skinny kernel streams them
            whole, per_layer = (self._native_q, self._native_q_layer) if low else \
                (self._native_args, self._native_layer_args)
            ex = lora is not None or low  # decode_layers_ex: scales and / or LoRA pools
            run = self.native.decode_layers_ex if ex else (
                self.native.decode_layers if fused else self.native.layers_forward)
            if iv is None or not (iv.offsets or iv.names):
                h = run(h, *whole, cache.k, cache.v, cos, sin, attn_mask, start, self.heads,
                        self.kv_heads, self.head_dim, self.eps, *(self._ex_args(low, lora) if ex else ()))
            else:  # one layer per call, the residual offsets and hooks in between
                for i, args in enumerate(per_layer):
                    extra = self._ex_args(low, lora, i) if ex else ()
                    h = iv.apply(f"blocks.{i}.hook_resid_pre", i, "hook_resid_pre", h)
                    h = run(h.contiguous(), *args, cache.k[i: i + 1], cache.v[i: i + 1], cos, sin, attn_mask, start,
                            self.heads, self.kv_heads, self.head_dim, self.eps, *extra)
                    h = iv.apply(f"blocks.{i}.hook_resid_post", i, "hook_resid_post", h)
        else:
            for i, ly in enumerate(self.layers):
                h = self._layer(i, ly, h, cache, start, end, cos, sin, attn_mask, iv, lora)
        cache.length = end
        return self.head(h, iv, last_only=not all_positions)

    def _ex_args(self, low: bool, lora, layer: int | None = None) -> tuple:
        """``decode_layers_ex``'s trailing arguments, for every layer or one: the int8 row scales (when the skinny
        kernel streams the low-precision matrices), the batch's LoRA pools and the low-precision-activations flag
        (q8 or bf16, by the weight format)."""
        scales = self._q_scales if low else []
        if layer is not None and scales:
            scales = scales[4 * layer: 4 * layer + 4]
        low_act = low and self.activations != "fp32"
        if lora is None:
            return scales, None, [], [], [], low_act
        return scales, *(lora.native if layer is None else lora.native_layer(layer)), low_act

    def _layer(self, i, ly, h, cache, start, end, cos, sin, attn_mask, iv, lora=None):
        """One decoder layer of the Python loop; ``iv``: interventions at each of its hook points; ``lora``:
        per-row LoRA terms (:class:`workbench.lora.compute.PackedLora`)."""
        B, T = h.shape[:2]
        H, KV, D = self.heads, self.kv_heads, self.head_dim
        at = (lambda kind, x: iv.apply(f"blocks.{i}.{kind}", i, kind, x)) if iv is not None else None
        if at:
            h = at("hook_resid_pre", h)
        qk, v = self.qkv_heads(ly, h, lora.adder(i) if lora is not None else None)
        qk = qk * cos + qk.roll(D // 2, -1) * sin  # RoPE on q and k heads at once
        cache.k[i, :, :, start:end] = qk[:, H:]
        cache.v[i, :, :, start:end] = v
        o = F.scaled_dot_product_attention(qk[:, :H], cache.k[i, :, :, :end], cache.v[i, :, :, :end],
                                           attn_mask=attn_mask, scale=D ** -0.5, enable_gqa=H != KV)
        o = o.transpose(1, 2)  # [B, T, H, D]
        add = lora.adder(i) if lora is not None else _no_lora
        if at is None:
            return self.finish_layer(ly, h, o.reshape(B, T, H * D), add)
        o = at("attn.hook_z", o)
        x = o.reshape(B, T, H * D)
        attn_out = at("hook_attn_out", add("o", _linear(ly, "wo", x, ly.bo), x))
        h = at("hook_resid_mid", h + attn_out)
        x = self._rms(h, ly.norm2)
        g, u = add("gu", _linear(ly, "wgu", x, ly.bgu), x).chunk(2, dim=-1)
        x = at("mlp.hook_post", F.silu(g) * u)
        mlp_out = at("hook_mlp_out", add("down", _linear(ly, "wdown", x, ly.bdown), x))
        return at("hook_resid_post", h + mlp_out)

    def finish_layer(self, ly: _Layer, h: torch.Tensor, attn: torch.Tensor, add=None) -> torch.Tensor:
        """Output projection + residual, then the SwiGLU MLP + residual. ``attn``: [..., heads * head_dim];
        ``add(group, out, x)``: adds LoRA terms to a projection's output."""
        add = add or _no_lora
        h = h + add("o", _linear(ly, "wo", attn, ly.bo), attn)
        x = self._rms(h, ly.norm2)
        g, u = add("gu", _linear(ly, "wgu", x, ly.bgu), x).chunk(2, dim=-1)
        x = F.silu(g) * u
        return h + add("down", _linear(ly, "wdown", x, ly.bdown), x)

    def _lora(self, applied):
        """The batch's LoRA terms in this backend's layout, rebuilt when the registry's pools change."""
        if applied is None or applied.lora is None:
            return None
        from workbench.lora.compute import PackedLora

        rl = applied.lora
        key = (id(rl.registry), rl.registry.version, self._fingerprint)
        if getattr(self, "_lora_key", None) != key:
            self._lora_tables = PackedLora.tables(rl.registry, self)
            self._lora_key = key
        return PackedLora(self._lora_tables, rl.rows)

    def head(self, h: torch.Tensor, applied=None, last_only: bool = False) -> torch.Tensor:
        """Final norm (hook point ``ln_final.hook_normalized``, which sees every position, as in HF) and LM
        head; ``last_only``: logits of the last position only (``h``: [B, T, d] -> [B, V])."""
        hooked = applied is not None and "ln_final.hook_normalized" in applied.names
        if last_only and not hooked:
            h = h[:, -1]
        x = self._rms(h, self.final_norm)
        if hooked:
            x = applied.apply("ln_final.hook_normalized", None, "ln_final.hook_normalized", x)
            if last_only:
                x = x[:, -1]
        if self.native is not None and self.lm_bias is None and x.numel() // x.shape[-1] <= self.SKINNY_MAX_ROWS:
            # a few rows (decode, verification): the C++ kernel reads the [vocab, d] head once for all rows
            rows = x.reshape(-1, x.shape[-1]).contiguous()
            if self.lm_head_q is not None:
                out = self.native.skinny_linear(rows, self.lm_head_q, self.lm_head_s, self.activations != "fp32")
            else:
                out = self.native.skinny_linear(rows, self.lm_head)
            return out.view(*x.shape[:-1], -1)
        return F.linear(x, self.lm_head, self.lm_bias)

    def reorder(self, cache: KVCache, index: torch.Tensor) -> None:
        cache.k.copy_(cache.k.index_select(1, index))
        cache.v.copy_(cache.v.index_select(1, index))

    def truncate(self, cache: KVCache, length: int) -> None:
        """Forget slots from ``length`` on (the next forward overwrites them)."""
        cache.length = min(cache.length, length)

    def kv(self, cache: KVCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's keys and values ``[B, kv_heads, slots, head_dim]`` (views into the cache)."""
        return [(cache.k[i], cache.v[i]) for i in range(cache.k.shape[0])]

    def empty_like(self, cache: KVCache, batch: int, max_len: int) -> KVCache:
        """A zeroed cache of ``batch`` rows and ``max_len`` slots, laid out like ``cache``."""
        return self.new_cache(batch, max_len)

    def set_length(self, cache: KVCache, length: int) -> None:
        """Slots ``[0, length)`` are filled: the next forward writes from ``length`` on."""
        cache.length = length

    def inexact_rollback(self, cache: KVCache) -> str | None:
        return None  # every layer attends to the whole cache (sliding windows are refused up front)


BACKENDS = {"hf": HFBackend, "packed-llama": PackedLlamaBackend}


def make_backend(model, name="auto", weights: str = "fp32", gguf=None, activations: str = "fp32",
                 prefill: str | None = None):
    """Build backend ``name`` (exact name, or ``auto``) for ``model``; a backend instance is used as is.
    ``weights`` other than fp32 (and ``activations`` other than fp32, and a ``prefill`` GEMM) are packed-backend
    choices: refused for a model or backend that cannot run them."""
    from workbench.engine.weights import check_activations, resolve_prefill

    check_activations(activations, weights)
    if prefill is not None:
        resolve_prefill(prefill, weights)
    if not isinstance(name, str):
        if getattr(name, "model", None) is not model:
            raise ValueError("the backend instance was built for another model")
        if gguf is not None:
            raise ValueError("gguf= is read when a packed backend is built; this backend instance already is")
        if getattr(name, "weights", "fp32") != weights:
            raise ValueError(f"the backend instance computes with weights={getattr(name, 'weights', 'fp32')!r}, "
                             f"not {weights!r}")
        if getattr(name, "activations", "fp32") != activations:
            raise ValueError(f"the backend instance computes with activations="
                             f"{getattr(name, 'activations', 'fp32')!r}, not {activations!r}")
        if prefill is not None and getattr(name, "prefill", None) != prefill:
            have = getattr(name, "prefill", None)
            raise ValueError(f"the backend instance runs prefills with {have!r}, not {prefill!r}" if have else
                             f"prefill={prefill!r} chooses the packed backend's GEMM; this backend instance runs "
                             "the model's own forward")
        return name
    if name == "auto":
        why = PackedLlamaBackend.unsupported(model)
        if why is None:
            return PackedLlamaBackend(model, weights=weights, gguf=gguf, activations=activations, prefill=prefill)
        if weights != "fp32":
            raise ValueError(f"weights={weights!r} needs the packed backend, which cannot run this model: {why}")
        if prefill is not None:
            raise ValueError(f"prefill={prefill!r} chooses the packed backend's GEMM, which cannot run this model: "
                             f"{why}")
        return HFBackend(model)
    if name not in BACKENDS:
        raise UnknownNameError("engine backend", name, [*BACKENDS, "auto"])
    if name == "packed-llama":
        return PackedLlamaBackend(model, weights=weights, gguf=gguf, activations=activations, prefill=prefill)
    if prefill is not None:
        raise ValueError(f"prefill={prefill!r} chooses the packed backend's GEMM; backend {name!r} runs the model's "
                         "own forward")
    if weights != "fp32":
        raise ValueError(f"weights={weights!r} is a packed-backend format; backend {name!r} computes with the "
                         "model's own weights")
    return BACKENDS[name](model)
