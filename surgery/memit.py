"""MEMIT: many edits spread over a range of MLP layers (Meng et al. 2023, "Mass-Editing Memory in a
Transformer", Alg. 1).

1. For each request, optimise a shift ``δᵢ`` of the output of the *last* layer ``L`` of the range at the
   subject's last token; the wanted residual there is ``zᵢ = hᵢᴸ + δᵢ``.
2. For each layer ``l`` of the range, ascending: recompute the keys ``K`` (averaged over prefixed contexts,
   as in ROME) and the current ``hᴸ`` on the weights updated so far, take the remaining residual
   ``R = (z − hᴸ) / (layers left)`` and solve the least-squares update (eq. 14)

       ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹,     λ = mom2_weight.

With ``spread_passes`` > 1, step 2 is repeated on what is still missing (``z`` is kept, the keys and ``hᴸ`` are
read again): each solve delivers only part of its residual (the ``λC`` or ``α I`` term shrinks it), so the
first pass can leave much of ``δ`` undelivered at ``L``; ``info["requests"][i]["delta_reached"]`` reports how
much arrived.

With one request and one layer, Sherman–Morrison gives ``ΔW = δ (C⁻¹k)ᵀ / (λ + kᵀC⁻¹k)``: ROME's update
scaled by ``kᵀC⁻¹k / (λ + kᵀC⁻¹k)``.
"""

from __future__ import annotations

import torch

from workbench.surgery.compute import compute_keys, compute_value, hook_at_subject


def memit_update(keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor, mom2_weight: float) -> torch.Tensor:
    """``[d_model, d_mlp]``: ``R Kᵀ (λC + KKᵀ)⁻¹`` with keys ``[n, d_mlp]`` and residuals ``[n, d_model]``."""
    k, r = keys.double(), resid.double()
    a = mom2_weight * cov.double().to(k.device) + k.T @ k
    x = torch.linalg.solve(a, k.T)  # [d_mlp, n] = A⁻¹ Kᵀ (A symmetric)
    return r.T @ x.T


def spread_edit(editor, requests, weights, solve) -> dict:
    """Steps 1-2 above with ``solve(layer, keys, resid) -> ΔW`` (MEMIT's or AlphaEdit's)."""
    hp, model, tok = editor.hparams, editor.model, editor.tok
    layers = list(hp.layers)
    last = layers[-1]
    prefixes = editor.prefixes()
    vals = [compute_value(model, tok, last, r, prefixes, hp) for r in requests]
    out_hook = f"blocks.{last}.hook_resid_post"
    z = hook_at_subject(model, tok, out_hook, requests) + torch.stack([v.delta for v in vals])
    per_layer = []
    for spread in range(hp.spread_passes):
        for i, layer in enumerate(layers):
            keys = compute_keys(model, tok, layer, requests, prefixes)
            cur = hook_at_subject(model, tok, out_hook, requests)
            resid = (z - cur) / (len(layers) - i)
            dw = solve(layer, keys, resid)
            weights.add(layer, dw)
            per_layer.append({"pass": spread, "layer": layer, "resid_norm": float(resid.norm(dim=-1).mean()),
                              "update_norm": float(dw.norm())})
    # fraction of each δ the updated weights deliver at the last layer: <h_final - h_start, δ> / |δ|²
    d = torch.stack([v.delta for v in vals])
    moved = hook_at_subject(model, tok, out_hook, requests) - (z - d)
    reached = (moved * d).sum(-1) / d.pow(2).sum(-1).clamp(min=1e-12)
    return {"requests": [{"nll_start": v.nll_start, "nll": v.nll, "steps": v.steps, "delta_norm": float(v.delta.norm()),
                          "delta_reached": float(f), "delta": v.delta.tolist()} for v, f in zip(vals, reached, strict=True)],
            "layers": per_layer, "prefixes": prefixes}


def apply_memit(editor, requests, weights) -> dict:
    hp = editor.hparams

    def solve(layer, keys, resid):
        return memit_update(keys, resid, editor.second_moment(layer, hp.ridge), hp.mom2_weight)

    return spread_edit(editor, requests, weights, solve)
