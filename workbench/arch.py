"""One architecture table: where each part of a Hugging Face causal LM lives, per exact ``config.model_type``.

Hook points (:mod:`workbench.interp`), RoPE scaling (:mod:`workbench.context`), the engine's packed backend and
attention sinks all read module paths and weight layouts from the :class:`ArchSpec` of a model's type, so a new
family is added in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class LlamaLayout:
    """Per-block module paths of a Llama-layout decoder layer (pre-norm RMSNorm, RoPE attention, SwiGLU MLP),
    as the packed backend reads them. ``q_norm`` / ``k_norm``: per-head RMSNorm on queries and keys before RoPE
    (Qwen3)."""

    input_norm: str = "input_layernorm"
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    post_norm: str = "post_attention_layernorm"
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    q_norm: str | None = None
    k_norm: str | None = None


@dataclass(frozen=True)
class ArchSpec:
    """Module paths (relative to the model or to one block) and weight layout for one architecture family."""

    layers: str  # the ModuleList of blocks
    embed: str  # token embedding; its output is hook_embed
    final_norm: str  # its output is ln_final.hook_normalized
    unembed: str
    attn: str  # attention module; output[1] is the pattern under eager attention
    attn_out: str  # module whose output is added to the residual after attention
    mlp_out: str  # module whose output is added to the residual after the MLP
    mlp_down: str  # its input is the MLP hidden activation (mlp.hook_post)
    o_proj: str  # its input is the per-head attention output (attn.hook_z), heads merged
    resid_in: str  # its input is the block's residual input, after every hook on the block's input
    pos_embed: str | None = None  # learned absolute positions (GPT-2)
    rotary: str | None = None  # the rotary-embedding module holding ``inv_freq``
    # "out_in": nn.Linear weights [out_features, in_features]; "in_out": GPT-2's Conv1D [in, out]
    weight_layout: str = "out_in"
    packed: LlamaLayout | None = None  # what the packed backend reads; None: it cannot run this family
    packed_refusal: str = ""  # why not, when ``packed`` is None

    def __post_init__(self):
        if self.weight_layout not in ("out_in", "in_out"):
            raise ValueError(f"weight_layout must be 'out_in' or 'in_out', got {self.weight_layout!r}")
        if self.packed is None and not self.packed_refusal:
            raise ValueError("an ArchSpec without a packed layout must say why (packed_refusal)")


_LLAMA_PATHS = dict(
    layers="model.layers", embed="model.embed_tokens", final_norm="model.norm", unembed="lm_head",
    attn="self_attn", attn_out="self_attn", mlp_out="mlp", mlp_down="mlp.down_proj", o_proj="self_attn.o_proj",
    resid_in="input_layernorm", rotary="model.rotary_emb",
)
LLAMA = ArchSpec(**_LLAMA_PATHS, packed=LlamaLayout())
QWEN3 = ArchSpec(**_LLAMA_PATHS, packed=LlamaLayout(q_norm="self_attn.q_norm", k_norm="self_attn.k_norm"))
# Gemma 2/3 normalise each sublayer's output before adding it to the residual ("sandwich" norms),
# so what the block adds is the post-norm output, as in TransformerLens.
GEMMA = ArchSpec(
    layers="model.layers", embed="model.embed_tokens", final_norm="model.norm", unembed="lm_head",
    attn="self_attn", attn_out="post_attention_layernorm", mlp_out="post_feedforward_layernorm",
    mlp_down="mlp.down_proj", o_proj="self_attn.o_proj", resid_in="input_layernorm", rotary="model.rotary_emb",
    packed_refusal="Gemma layers use sandwich norms, GeGLU, scaled embeddings and local/global RoPE",
)
GPT2 = ArchSpec(
    layers="transformer.h", embed="transformer.wte", final_norm="transformer.ln_f", unembed="lm_head",
    attn="attn", attn_out="attn", mlp_out="mlp", mlp_down="mlp.c_proj", o_proj="attn.c_proj", resid_in="ln_1",
    pos_embed="transformer.wpe", weight_layout="in_out",
    packed_refusal="GPT-2 uses LayerNorm, learned positions and Conv1D weights",
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": QWEN3,
    "gemma2": GEMMA,
    "gemma3_text": GEMMA,
    "gpt2": GPT2,
}


def arch_of(model: nn.Module) -> ArchSpec:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise NotImplementedError(
            f"no architecture entry for model_type {model_type!r}; supported: {sorted(ARCHITECTURES)}. "
            "Add an ArchSpec to workbench.arch.ARCHITECTURES for a new family."
        )
    return ARCHITECTURES[model_type]


def get_module(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
    return mod


def layers_of(model: nn.Module) -> nn.ModuleList:
    return get_module(model, arch_of(model).layers)
