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
With ``preserve_subjects`` the keys of other subjects in the request's template are held fixed as well
(:mod:`workbench.surgery.preserve`): ``u`` is replaced by the direction that also gives them ``ρ = 0``.
"""

from __future__ import annotations

import torch

from workbench.surgery import preserve
from workbench.surgery.compute import compute_keys, compute_value


def key_direction(key: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """``C⁻¹k / (kᵀC⁻¹k)`` (float64): the right vector of ROME's update, scaled so that its product with ``k`` is 1."""
    k, c = key.double(), cov.double().to(key.device)
    u = torch.linalg.solve(c, k)
    return u / (k @ u)


def rome_update(key: torch.Tensor, residual: torch.Tensor, cov: torch.Tensor,
                direction: torch.Tensor | None = None) -> torch.Tensor:
    """``[d_model, d_mlp]`` rank-one ``ΔW = r (C⁻¹k)ᵀ / (kᵀC⁻¹k)`` (float64); ``direction`` replaces the right
    vector (one with ``directionᵀk = 1``, e.g. :func:`workbench.surgery.preserve.preserving_direction`)."""
    u = key_direction(key, cov) if direction is None else direction.double()
    return torch.outer(residual.double(), u)


def _preserved(editor, req, key, cov, pool, cache) -> tuple[torch.Tensor, list[str]]:
    """The preserving direction for ``req`` and the subjects it holds fixed (their keys cached per template:
    ROME changes only this layer's down projection, which its keys do not depend on)."""
    hp = editor.hparams
    subjects = preserve.candidates(req, pool)
    if len(subjects) < hp.preserve_subjects:
        raise preserve.NoCandidatesError(
            f"preserve_subjects={hp.preserve_subjects} but only {len(subjects)} candidate subjects remain for "
            f"{req.subject!r}; give preserve_pool or preserve fewer")
    template = req.template
    if template not in cache:
        cache[template] = (pool, preserve.template_keys(editor.model, editor.tok, hp.layer, template, pool))
    index = {c: i for i, c in enumerate(cache[template][0])}
    keys = cache[template][1][[index[c] for c in subjects]]
    top = preserve.most_moved(key_direction(key, cov), keys, hp.preserve_subjects)
    return preserve.preserving_direction(key, cov, keys[top]), [subjects[i] for i in top.tolist()]


def apply_rome(editor, requests, weights) -> dict:
    hp, model, tok = editor.hparams, editor.model, editor.tok
    layer = hp.layer
    cov = editor.second_moment(layer, hp.ridge)
    prefixes = editor.prefixes()
    info, cache = [], {}
    pool = None
    if hp.preserve_subjects:
        pool = list(hp.preserve_pool) if hp.preserve_pool is not None else preserve.vocab_subjects(tok)
    for req in requests:
        key = compute_keys(model, tok, layer, [req], prefixes)[0]
        u, kept = key_direction(key, cov), []
        if hp.preserve_subjects:
            u, kept = _preserved(editor, req, key, cov, pool, cache)
        val = compute_value(model, tok, layer, req, prefixes, hp, key_dir=u if hp.value_through_update else None)
        weights.add(layer, rome_update(key, val.delta, cov, direction=u))
        info.append({"layer": layer, "nll_start": val.nll_start, "nll": val.nll, "steps": val.steps,
                     "delta_norm": float(val.delta.norm()), "key_norm": float(key.norm()),
                     "delta": val.delta.tolist(), "preserved": kept})
    return {"requests": info, "prefixes": prefixes}
