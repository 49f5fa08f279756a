"""FT-L: constrained fine-tuning of one MLP down projection (Zhu et al. 2020, "Modifying Memories in
Transformer Models"), the baseline of the editing papers.

Adam on the target NLL of ``prompt + target`` for every request at once; after each step every weight is
clamped to within ``norm_constraint`` of its original value (an L∞ ball, as in EasyEdit's FT-L). Only the
one weight receives gradients.
"""

from __future__ import annotations

import logging

import torch

from workbench.surgery.compute import _pad, _pad_id, device_of, down_proj, logits_at
from workbench.surgery.requests import prompt_ids, target_ids

log = logging.getLogger(__name__)


def apply_ft(editor, requests, weights) -> dict:
    hp, model, tok = editor.hparams, editor.model, editor.tok
    dev = device_of(model)
    seqs, rows, cols, labels = [], [], [], []
    for r, req in enumerate(requests):
        pid, tid = prompt_ids(tok, req.text), target_ids(tok, req.text, req.target_new)
        seqs.append(pid + tid[:-1])
        for j, t in enumerate(tid):
            rows.append(r)
            cols.append(len(pid) - 1 + j)
            labels.append(t)
    ids, mask = _pad(seqs, _pad_id(tok), dev)
    rows, cols, labels = (torch.tensor(x, device=dev) for x in (rows, cols, labels))
    param = down_proj(model, hp.layer).weight
    weights.track(hp.layer)
    w0 = param.detach().clone()
    lo, hi = w0 - hp.norm_constraint, w0 + hp.norm_constraint
    opt = torch.optim.Adam([param], lr=hp.lr, weight_decay=hp.weight_decay)
    had_grad = param.requires_grad
    param.requires_grad_(True)
    nll_start = nll_val = float("nan")
    step = 0
    try:
        for step in range(hp.steps + 1):
            logits = logits_at(model, ids, mask, rows, cols).float()
            nll = -torch.log_softmax(logits, -1)[torch.arange(len(labels), device=dev), labels].mean()
            nll_val = float(nll.detach())
            if step == 0:
                nll_start = nll_val
            if nll_val < hp.stop_loss or step == hp.steps:
                break
            (grad,) = torch.autograd.grad(nll, [param])
            param.grad = grad
            opt.step()
            param.grad = None
            with torch.no_grad():
                param.copy_(torch.minimum(torch.maximum(param, lo), hi))
    finally:
        param.grad = None
        param.requires_grad_(had_grad)
    log.info("FT-L at layer %d: target NLL %.3f -> %.3f in %d steps", hp.layer, nll_start, nll_val, step)
    return {"layer": hp.layer, "nll_start": nll_start, "nll": nll_val, "steps": step}
