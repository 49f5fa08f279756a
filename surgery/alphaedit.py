"""AlphaEdit: MEMIT with the update projected onto the null space of preserved knowledge (Fang et al. 2025,
"AlphaEdit: Null-Space Constrained Knowledge Editing for Language Models", eqs. 10-13).

``P`` projects onto the eigenvectors of ``C = E[k kᵀ]`` (keys of ordinary text) whose eigenvalue is below
``null_threshold`` times the largest one (a relative threshold, so it does not depend on the keys' scale).
With the new keys ``K₁``, residuals ``R`` and the keys of every earlier edit ``K_p`` (accumulated by
:class:`workbench.surgery.edit.Editor` across calls),

    ΔW = R K₁ᵀ P (P (λ_p K_p K_pᵀ + K₁ K₁ᵀ) P + α I)⁻¹.

``λ_p`` (``prev_weight``) is 1 in the paper. Larger, it keeps later batches from moving the earlier edits' keys
(``ΔW k_p → 0``) while the new keys' solve is damped only along the old keys' directions, where a larger ``α``
damps every direction.

``P`` commutes with the bracket, so ``ΔW = ΔW P``: the update's rows lie in the null space and
``ΔW k ≈ 0`` for preserved keys ``k``. Residuals are spread over the layers as in MEMIT.
"""

from __future__ import annotations

import logging

import torch

from workbench.surgery.memit import spread_edit

log = logging.getLogger(__name__)


class EmptyNullSpaceError(ValueError):
    pass


def null_projector(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """``P = U₀ U₀ᵀ`` over the eigenvectors of ``cov`` with eigenvalue < ``threshold`` · the largest."""
    evals, evecs = torch.linalg.eigh(cov.double())
    keep = evals < threshold * evals.max()
    if not keep.any():
        raise EmptyNullSpaceError(f"null space is empty at null_threshold={threshold}: raise it")
    u = evecs[:, keep]
    log.info("AlphaEdit null space: %d of %d dimensions (threshold %.3g of the largest eigenvalue)",
             int(keep.sum()), cov.shape[0], threshold)
    return u @ u.T


def alphaedit_update(keys, resid, proj, prev, l2: float, prev_weight: float = 1.0) -> torch.Tensor:
    """``[d_model, d_mlp]`` update above; ``prev`` = ``K_p K_pᵀ`` (``[d_mlp, d_mlp]``, zeros before any edit)."""
    k, r, p = keys.double(), resid.double(), proj.double().to(keys.device)
    a = p @ (prev_weight * prev.double().to(k.device) + k.T @ k) @ p + l2 * torch.eye(p.shape[0], dtype=p.dtype,
                                                                                        device=p.device)
    x = torch.linalg.solve(a, p @ k.T)  # [d_mlp, n] = A⁻¹ P K₁ᵀ (A, P symmetric)
    return r.T @ x.T


def apply_alphaedit(editor, requests, weights) -> dict:
    hp = editor.hparams
    new_keys = {}

    def solve(layer, keys, resid):
        proj = editor.cached(("null", layer), lambda: null_projector(editor.second_moment(layer, hp.ridge),
                                                                      hp.null_threshold))
        prev = editor.state.get(("prev_keys", layer))
        if prev is None:
            prev = torch.zeros_like(proj)
        new_keys[layer] = keys.double().T @ keys.double()
        return alphaedit_update(keys, resid, proj, prev, hp.l2, hp.prev_weight)

    info = spread_edit(editor, requests, weights, solve)
    # only once the whole batch went in: a failed edit leaves the accumulated keys as they were
    for layer, kk in new_keys.items():
        editor.state[("prev_keys", layer)] = editor.state.get(("prev_keys", layer), 0) + kk
    return info
