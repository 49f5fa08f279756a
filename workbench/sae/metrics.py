"""SAE evaluation with SAELens' formulas.

- ``l0``: mean number of active latents per token.
- ``explained_variance`` = 1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2); ``fvu`` = 1 - explained_variance.
- ``mse``: mean squared error per element.
- ``ce_loss_score`` = (CE_zero - CE_sae) / (CE_zero - CE_clean): the share of the loss gap between zero-ablating
  the hook point and the clean model that splicing in the SAE reconstruction recovers; ``kl_div_score`` likewise
  with KL to the clean next-token distribution.
- ``dead_fraction``: latents that never fire on the evaluation tokens.

Positions before ``exclude_first`` (attention-sink outliers the SAE was not trained on) keep their clean
activation in the spliced runs and are left out of every metric. Likewise tokens with "massive activations"
(norm above ``outlier_ratio`` x the batch median; see ``StoreConfig.outlier_ratio``) keep their clean activation
and are left out of the reconstruction metrics (their count is reported); the CE/KL metrics cover all positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workbench.interp.hooks import Hooks
from workbench.sae.model import SparseAutoencoder
from workbench.sae.store import inlier_mask


@torch.no_grad()
def evaluate_sae(sae: SparseAutoencoder, model: nn.Module, windows: torch.Tensor, hook_name: str, *,
                 exclude_first: int = 1, batch_size: int = 8, outlier_ratio: float | None = 10.0) -> dict[str, float]:
    """Evaluate on ``[n, seq]`` token windows (held out from training)."""
    if windows.ndim != 2 or windows.shape[1] <= exclude_first + 1:
        raise ValueError(f"windows must be [n, seq] with seq > exclude_first + 1, got {tuple(windows.shape)}")
    device = next(model.parameters()).device
    d_sae = sae.cfg.d_sae
    fired = torch.zeros(d_sae, dtype=torch.bool, device=sae.W_enc.device)
    n_tok, n_out, l0_sum, sq_err, sum_x, sum_sq = 0, 0, 0.0, 0.0, None, 0.0
    ce = {"clean": [], "sae": [], "zero": []}
    kl = {"sae": [], "zero": []}
    captured: dict[str, torch.Tensor] = {}

    def splice(mode):
        def fn(act, _hook):
            x = act[:, exclude_first:]
            keep = inlier_mask(x.float(), outlier_ratio).unsqueeze(-1)
            captured["x"], captured["keep"] = x.float(), keep
            if mode == "clean":
                return None
            new = act.clone()
            if mode == "sae":
                f = sae.encode(x.to(sae.W_enc.device))
                captured["f"] = f
                new[:, exclude_first:] = torch.where(keep, sae.decode(f).to(act.dtype).to(act.device), x)
            else:
                new[:, exclude_first:] = torch.where(keep, torch.zeros_like(x), x)
            return new
        return fn

    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start: start + batch_size].to(device)
        logp = {}
        for mode in ("clean", "sae", "zero"):
            with Hooks(model, [(hook_name, splice(mode))]):
                logits = model(ids).logits[:, exclude_first:-1].float()
            logp[mode] = logits.log_softmax(-1)
            targets = ids[:, exclude_first + 1:]
            ce[mode].append(F.nll_loss(logp[mode].flatten(0, 1), targets.flatten(), reduction="none"))
            if mode == "clean":
                x = captured["x"].flatten(0, 1)
            if mode == "sae":
                keep = captured["keep"].flatten()
                n_out += int((~keep).sum())
                x = x[keep]
                f = captured["f"].flatten(0, 1)[keep]
                recon = sae.decode(f).float()
                fired |= (f > 0).any(0)
                l0_sum += float((f > 0).sum())
                sq_err += float((x.to(recon.device) - recon).pow(2).sum())
                xs = x.to(torch.float64)
                sum_x = xs.sum(0) if sum_x is None else sum_x + xs.sum(0)
                sum_sq += float(xs.pow(2).sum())
                n_tok += x.shape[0]
        p_clean = logp["clean"].exp()
        for mode in ("sae", "zero"):
            kl[mode].append((p_clean * (logp["clean"] - logp[mode])).sum(-1).flatten())
    ce_m = {k: float(torch.cat(v).mean()) for k, v in ce.items()}
    kl_m = {k: float(torch.cat(v).mean()) for k, v in kl.items()}
    total_var = sum_sq / n_tok - float((sum_x / n_tok).pow(2).sum())
    ev = 1.0 - (sq_err / n_tok) / total_var
    return {
        "tokens": n_tok,
        "outliers_excluded": n_out,
        "l0": l0_sum / n_tok,
        "mse": sq_err / (n_tok * sae.cfg.d_in),
        "explained_variance": ev,
        "fvu": 1.0 - ev,
        "ce_loss_clean": ce_m["clean"],
        "ce_loss_with_sae": ce_m["sae"],
        "ce_loss_with_ablation": ce_m["zero"],
        "ce_loss_score": (ce_m["zero"] - ce_m["sae"]) / (ce_m["zero"] - ce_m["clean"]),
        "kl_div_with_sae": kl_m["sae"],
        "kl_div_with_ablation": kl_m["zero"],
        "kl_div_score": (kl_m["zero"] - kl_m["sae"]) / kl_m["zero"],
        "dead_fraction": float((~fired).float().mean()),
    }
