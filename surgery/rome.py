"""ROME in the r-ROME form: one rank-one update of one MLP down projection per request.

Meng et al. 2022 ("Locating and Editing Factual Associations in GPT", eq. 2) insert a key-value pair
``(k*, v*)`` into ``W`` with least disturbance of the other keys, weighted by ``C = E[k kᵀ]``:

    W' = W + (v* − W k*) (C⁻¹ k*)ᵀ / (k*ᵀ C⁻¹ k*),      so that  W' k* = v*.

The original implementation averaged ``k*`` over prefixed contexts for the left vector but took the residual
from the unprefixed prompt's key, an asymmetry that collapses models under sequential edits; r-ROME (Gupta et
al. 2024, arXiv 2403.07175) uses the one averaged key everywhere, which is what is done here. ``v* = W k* + δ``
with ``δ`` from :func:`workbench.surgery.compute.compute_value`, so the residual is ``δ``. Several requests are
applied one after the other, each with keys and values computed on the weights the previous one left.

The update adds ``ρ δ`` at every position, ``ρ = uᵀk / uᵀk*`` with ``u = C⁻¹k*``; ``ρ`` averages to 1 over the
contexts ``k*`` comes from but not in each. With ``value_through_update`` δ is optimised through the update
itself (every position gets ``ρ δ`` during the optimisation), so the loss minimised is the edited model's.
"""

from __future__ import annotations

import torch

from workbench.surgery.compute import compute_keys, compute_value


def key_direction(key: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """``C⁻¹k / (kᵀC⁻¹k)`` (float64): the right vector of ROME's update, scaled so that its product with ``k`` is 1."""
    k, c = key.double(), cov.double().to(key.device)
    u = torch.linalg.solve(c, k)
    return u / (k @ u)


def rome_update(key: torch.Tensor, residual: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """``[d_model, d_mlp]`` rank-one ``ΔW = r (C⁻¹k)ᵀ / (kᵀC⁻¹k)`` (float64)."""
    return torch.outer(residual.double(), key_direction(key, cov))


def apply_rome(editor, requests, weights) -> dict:
    hp, model, tok = editor.hparams, editor.model, editor.tok
    layer = hp.layer
    cov = editor.second_moment(layer, hp.ridge)
    prefixes = editor.prefixes()
    info = []
    for req in requests:
        key = compute_keys(model, tok, layer, [req], prefixes)[0]
        val = compute_value(model, tok, layer, req, prefixes, hp,
                            key_dir=key_direction(key, cov) if hp.value_through_update else None)
        weights.add(layer, rome_update(key, val.delta, cov))
        info.append({"layer": layer, "nll_start": val.nll_start, "nll": val.nll, "steps": val.steps,
                     "delta_norm": float(val.delta.norm()), "key_norm": float(key.norm()),
                     "delta": val.delta.tolist()})
    return {"requests": info, "prefixes": prefixes}
