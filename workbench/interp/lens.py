"""Logit lens (nostalgebraist, 2020): read each layer's residual stream through the final norm and unembedding."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from workbench.interp.arch import arch_of, get_module
from workbench.interp.cache import run_with_cache
from workbench.interp.hooks import hook_names


def unembed(model: nn.Module, resid: torch.Tensor) -> torch.Tensor:
    """Logits the model would produce if ``resid`` were its last residual stream (final norm, unembedding,
    and the logit soft-cap of models that have one)."""
    spec = arch_of(model)
    logits = get_module(model, spec.unembed)(get_module(model, spec.final_norm)(resid))
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@dataclass
class LogitLensResult:
    names: list[str]  # hook points read, in layer order
    positions: list[int]
    logits: torch.Tensor  # [n_names, batch, n_positions, vocab]

    def probs(self) -> torch.Tensor:
        return self.logits.float().softmax(-1)

    def prob_of(self, token_id: int) -> torch.Tensor:
        """``[n_names, batch, n_positions]`` probability of one token at every layer."""
        return self.probs()[..., token_id]

    def rank_of(self, token_id: int) -> torch.Tensor:
        """``[n_names, batch, n_positions]`` rank (0 = top) of one token at every layer."""
        target = self.logits[..., token_id : token_id + 1]
        return (self.logits > target).sum(-1)

    def top_tokens(self, tokenizer, k: int = 5, batch: int = 0, position: int = -1) -> list[list[tuple[str, float]]]:
        """Per layer, the top-k (token, probability) at one batch row and one of the read positions."""
        p = self.probs()[:, batch, position]
        vals, ids = p.topk(k, dim=-1)
        return [[(tokenizer.decode([int(i)]), float(v)) for v, i in zip(vr, ir, strict=True)] for vr, ir in zip(vals, ids, strict=True)]


def logit_lens(model: nn.Module, input_ids: torch.Tensor, *, positions: int | list[int] | None = -1,
               kind: str = "hook_resid_post", include_embed: bool = True, **kwargs) -> LogitLensResult:
    """Logit lens at every block's ``kind`` residual point (default: after each block).

    ``positions``: one position, a list, or None for all. With ``include_embed`` the embeddings
    (``blocks.0.hook_resid_pre``) come first. The last row of the default equals the model's own logits.
    """
    if kind not in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post"):
        raise ValueError(f"kind must be a residual point (hook_resid_pre/mid/post), got {kind!r}")
    n_layers = len(get_module(model, arch_of(model).layers))
    names = (["blocks.0.hook_resid_pre"] if include_embed and kind != "hook_resid_pre" else [])
    names += [f"blocks.{i}.{kind}" for i in range(n_layers)]
    assert set(names) <= set(hook_names(model))
    seq = input_ids.shape[-1]
    pos = list(range(seq)) if positions is None else [positions] if isinstance(positions, int) else list(positions)
    for p in pos:
        if not -seq <= p < seq:
            raise IndexError(f"position {p} out of range for a sequence of {seq} tokens")
    _, cache = run_with_cache(model, input_ids, names=names, **kwargs)
    with torch.no_grad():
        logits = torch.stack([unembed(model, cache[n][:, pos]) for n in names])
    return LogitLensResult(names, pos, logits)
