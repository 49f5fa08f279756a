"""Preserved subjects for ROME: keep the keys of other subjects, put in the edit's own prompt, out of the update.

ROME's update adds ``ρ δ`` wherever the key is ``k``, with ``ρ = uᵀk`` and ``u = C⁻¹k* / (k*ᵀC⁻¹k*)``. ``C`` is
estimated from general text, where a relation's subjects (countries, cities) are rare, so what such subjects
share is weighted little and another subject of the same kind in the same prompt can get a large ``ρ``: its
answer moves with the edited one.

ROME is the least change in ``C``'s norm under the equality constraint ``ΔW k* = δ`` (the preservation-memorization
view of Gupta et al. 2024, "A Unified Framework for Model Editing", arXiv 2403.14236). With preserved keys ``K_p``
(columns) equality constraints ``ΔW K_p = 0`` are added, and the update stays rank one:

    min ‖ΔW C^{1/2}‖  s.t.  ΔW k* = δ,  ΔW K_p = 0   →   ΔW = δ uᵀ,
    u ∝ C⁻¹k* − C⁻¹K_p (K_pᵀC⁻¹K_p)⁺ K_pᵀC⁻¹k*,  scaled so that uᵀk* = 1.

The preserved keys are chosen per request without any evaluation data: every candidate subject (by default the
vocabulary's capitalised words, :func:`vocab_subjects`; none that contains the edited subject or is contained in
it) is put in the request's template, and the ``n`` with the largest ``|ρ|`` under the plain update are kept.
"""

from __future__ import annotations

import contextlib
import re

import torch

from workbench.interp.hooks import Hooks
from workbench.surgery.compute import StopForward, _pad, _pad_id, device_of, subject_index
from workbench.surgery.hparams import HparamsError
from workbench.surgery.requests import EditRequest, prompt_ids

_WORD = re.compile(r"[A-Z][a-z]{2,}")


class NoCandidatesError(HparamsError):
    """``preserve_subjects`` cannot be met for a request: too few candidate subjects, or the edited key lies in the
    span of the preserved ones."""


def vocab_subjects(tok) -> list[str]:
    """The tokenizer's single-token capitalised words (``[A-Z][a-z]{2,}``, leading space stripped), sorted."""
    words = {tok.decode([i]).strip() for i in range(len(tok))}
    return sorted(w for w in words if _WORD.fullmatch(w))


def candidates(req: EditRequest, pool: list[str]) -> list[str]:
    """``pool`` without the subjects that contain the edited subject or are contained in it (any case)."""
    s = req.subject.lower()
    return [c for c in pool if c.lower() not in s and s not in c.lower()]


@torch.no_grad()
def template_keys(model, tok, layer: int, template: str, subjects: list[str], batch_size: int = 256) -> torch.Tensor:
    """``[len(subjects), d_mlp]`` float64: the key at ``blocks.{layer}.mlp.hook_post`` at each subject's last token
    with the subject put in ``template`` (no prefix); the forward stops at the key."""
    dev, out = device_of(model), []
    start = template.index("{}")
    for s in range(0, len(subjects), batch_size):
        texts = [template.replace("{}", c, 1) for c in subjects[s:s + batch_size]]
        ids, mask = _pad([prompt_ids(tok, t) for t in texts], _pad_id(tok), dev)
        at = torch.tensor([subject_index(tok, t, start + len(c)) for t, c in zip(texts, subjects[s:s + batch_size],
                                                                                   strict=True)], device=dev)
        got = {}

        def grab(act, hook, at=at, got=got):
            got["k"] = act[torch.arange(act.shape[0], device=act.device), at]
            raise StopForward

        with Hooks(model, [(f"blocks.{layer}.mlp.hook_post", grab)]), contextlib.suppress(StopForward):
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        out.append(got["k"].double())
    return torch.cat(out)


def most_moved(key_dir: torch.Tensor, keys: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the ``n`` rows of ``keys`` with the largest ``|key_dirᵀk|`` (the subjects the update moves most)."""
    rho = (keys.double() @ key_dir.double().to(keys.device)).abs()
    return torch.argsort(rho, descending=True, stable=True)[:n]


def preserving_direction(key: torch.Tensor, cov: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``u`` (float64) with ``uᵀk* = 1`` and ``uᵀk_p = 0`` for every row ``k_p`` of ``kept`` (module doc)."""
    k, c = key.double(), cov.double().to(key.device)
    kp = kept.double().to(key.device).T  # [d, n]
    a = torch.linalg.solve(c, k)
    b = torch.linalg.solve(c, kp)
    # (K_pᵀC⁻¹K_p)⁺: near-duplicate candidates make it singular; the pseudo-inverse keeps the constraints' span
    u = a - b @ (torch.linalg.pinv(kp.T @ b, hermitian=True) @ (kp.T @ a))
    den = k @ u
    if not torch.isfinite(den) or float(den.abs()) <= 1e-12 * float(k @ a):
        raise NoCandidatesError("the edited key lies in the span of the preserved keys; preserve fewer subjects")
    return u / den
