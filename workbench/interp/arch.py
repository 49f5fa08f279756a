"""Where each named hook point lives inside a Hugging Face model, per architecture.

A hook point is read or replaced through ordinary torch hooks on the existing modules, so the model is
never rewritten. Names follow TransformerLens (``blocks.{i}.hook_resid_pre`` ...) so analysis code moves
between the two. The table is keyed by the exact ``config.model_type``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """Module paths (relative to the model or to one block) for one architecture family."""

    layers: str  # the ModuleList of blocks
    embed: str  # token embedding; its output is hook_embed
    final_norm: str  # its output is ln_final.hook_normalized
    unembed: str
    attn: str  # attention module; output[1] is the pattern under eager attention
    attn_out: str  # module whose output is added to the residual after attention
    mlp_out: str  # module whose output is added to the residual after the MLP
    mlp_down: str  # its input is the MLP hidden activation (mlp.hook_post)
    o_proj: str  # its input is the per-head attention output (attn.hook_z), heads merged
    pos_embed: str | None = None  # learned absolute positions (GPT-2)


LLAMA = ArchSpec(
    layers="model.layers", embed="model.embed_tokens", final_norm="model.norm", unembed="lm_head",
    attn="self_attn", attn_out="self_attn", mlp_out="mlp", mlp_down="mlp.down_proj", o_proj="self_attn.o_proj",
)
# Gemma 2/3 normalise each sublayer's output before adding it to the residual ("sandwich" norms),
# so what the block adds is the post-norm output, as in TransformerLens.
GEMMA = ArchSpec(
    layers="model.layers", embed="model.embed_tokens", final_norm="model.norm", unembed="lm_head",
    attn="self_attn", attn_out="post_attention_layernorm", mlp_out="post_feedforward_layernorm",
    mlp_down="mlp.down_proj", o_proj="self_attn.o_proj",
)
GPT2 = ArchSpec(
    layers="transformer.h", embed="transformer.wte", final_norm="transformer.ln_f", unembed="lm_head",
    attn="attn", attn_out="attn", mlp_out="mlp", mlp_down="mlp.c_proj", o_proj="attn.c_proj",
    pos_embed="transformer.wpe",
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": LLAMA,
    "gemma2": GEMMA,
    "gemma3_text": GEMMA,
    "gpt2": GPT2,
}


def arch_of(model: nn.Module) -> ArchSpec:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise NotImplementedError(
            f"no hook points for model_type {model_type!r}; supported: {sorted(ARCHITECTURES)}. "
            "Add an ArchSpec to workbench.interp.arch.ARCHITECTURES for a new family."
        )
    return ARCHITECTURES[model_type]


def get_module(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
    return mod


def layers_of(model: nn.Module) -> nn.ModuleList:
    return get_module(model, arch_of(model).layers)
