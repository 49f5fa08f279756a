"""Feature dashboards: a static HTML page with, per SAE latent, its top-activating contexts, its activation
density and its direct logit effects (decoder direction through the final norm's gain and the unembedding)."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from workbench.interp.arch import arch_of, get_module
from workbench.sae.model import SparseAutoencoder
from workbench.sae.store import activations_at


@dataclass
class FeatureReport:
    feature: int
    density: float  # fraction of tokens where it fires
    max_activation: float
    examples: list[dict] = field(default_factory=list)  # {"tokens", "acts", "position", "activation"}
    top_logits: list[tuple[str, float]] = field(default_factory=list)
    bottom_logits: list[tuple[str, float]] = field(default_factory=list)


@torch.no_grad()
def feature_reports(sae: SparseAutoencoder, model: nn.Module, tokenizer, windows: torch.Tensor, hook_name: str, *,
                    features: list[int] | None = None, n_features: int = 20, n_examples: int = 8, context: int = 12,
                    n_logits: int = 8, exclude_first: int = 1, batch_size: int = 8) -> list[FeatureReport]:
    """Scan ``windows`` once; report the given ``features`` (default: the ``n_features`` most frequent)."""
    d_sae = sae.cfg.d_sae
    if features is not None:
        bad = [f for f in features if not 0 <= f < d_sae]
        if bad:
            raise IndexError(f"features {bad} out of range for d_sae={d_sae}")
    device = next(model.parameters()).device
    counts = torch.zeros(d_sae)
    best_val = torch.full((d_sae, n_examples), -1.0)
    best_loc = torch.zeros(d_sae, n_examples, 2, dtype=torch.long)
    n_tok = 0
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start: start + batch_size]
        f = sae.encode(activations_at(model, ids.to(device), hook_name).float()).cpu()
        f[:, :exclude_first] = 0
        b, s, _ = f.shape
        n_tok += b * (s - exclude_first)
        counts += (f > 0).sum((0, 1)).float()
        # per feature, the strongest position of each window, merged into the running top-n
        val, pos = f.max(1)  # [b, d_sae]
        rows = torch.arange(start, start + b).unsqueeze(1).expand(b, d_sae)
        cand_val = torch.cat([best_val, val.t()], 1)
        cand_loc = torch.cat([best_loc, torch.stack([rows.t(), pos.t()], -1)], 1)
        top = cand_val.topk(n_examples, dim=1).indices
        best_val = cand_val.gather(1, top)
        best_loc = cand_loc.gather(1, top.unsqueeze(-1).expand(-1, -1, 2))
    if features is None:
        features = counts.topk(min(n_features, d_sae)).indices.tolist()
    effects = _logit_effects(sae, model, features)
    reports = []
    for j, feat in enumerate(features):
        rep = FeatureReport(feat, float(counts[feat] / max(n_tok, 1)), float(best_val[feat].max().clamp(min=0)))
        for val, (row, pos) in zip(best_val[feat].tolist(), best_loc[feat].tolist(), strict=True):
            if val <= 0:
                continue
            lo = max(0, pos - context)
            ids = windows[row, lo: pos + 4]
            acts = sae.encode(activations_at(model, windows[row: row + 1].to(device), hook_name).float())[0, lo: pos + 4, feat]
            rep.examples.append({"tokens": [tokenizer.decode([int(t)]) for t in ids], "acts": acts.cpu().tolist(),
                                 "position": pos - lo, "activation": val})
        vals, idx = effects[j].topk(n_logits)
        rep.top_logits = [(tokenizer.decode([int(i)]), float(v)) for v, i in zip(vals, idx, strict=True)]
        vals, idx = (-effects[j]).topk(n_logits)
        rep.bottom_logits = [(tokenizer.decode([int(i)]), -float(v)) for v, i in zip(vals, idx, strict=True)]
        reports.append(rep)
    return reports


def _logit_effects(sae: SparseAutoencoder, model: nn.Module, features: list[int]) -> torch.Tensor:
    """``[n, vocab]`` direct effect of each decoder direction on the logits (final-norm gain folded in)."""
    spec = arch_of(model)
    w_u = get_module(model, spec.unembed).weight.float()
    norm = get_module(model, spec.final_norm)
    gain = getattr(norm, "weight", None)
    d = sae.W_dec[features].float().to(w_u.device)
    if gain is not None:
        g = gain.float()
        if model.config.model_type.startswith("gemma"):  # Gemma's RMSNorm scales by (1 + weight)
            g = 1.0 + g
        d = d * g
    return (d @ w_u.t()).cpu()


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}
.feat{border:1px solid #ccc;border-radius:6px;padding:1em;margin:1em 0}
.ctx{font-family:monospace;white-space:pre-wrap;margin:.3em 0}.tok{border-radius:3px}
.cur{outline:1px solid #333}.logits span{display:inline-block;margin:0 .5em .2em 0;font-family:monospace}
.pos{color:#1a7f37}.neg{color:#b42318}"""


def render_dashboard(reports: list[FeatureReport], *, title: str = "SAE features") -> str:
    """Static HTML (no scripts, no external resources)."""
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    for r in reports:
        out.append(f"<div class='feat' id='feature-{r.feature}'><h2>Feature {r.feature}</h2>"
                   f"<p>density {r.density:.4%} &middot; max activation {r.max_activation:.3f}</p><h3>Top contexts</h3>")
        for ex in r.examples:
            peak = max(ex["acts"]) or 1.0
            toks = []
            for i, (t, a) in enumerate(zip(ex["tokens"], ex["acts"], strict=True)):
                alpha = max(0.0, a) / peak
                cls = "tok cur" if i == ex["position"] else "tok"
                toks.append(f"<span class='{cls}' title='{a:.3f}' style='background:rgba(255,120,0,{alpha:.2f})'>"
                            f"{html.escape(t)}</span>")
            out.append(f"<div class='ctx' data-activation='{ex['activation']:.4f}'>{''.join(toks)}</div>")
        out.append("<h3>Logit effects</h3><div class='logits'>")
        out += [f"<span class='pos'>{html.escape(t)} +{v:.3f}</span>" for t, v in r.top_logits]
        out.append("<br>")
        out += [f"<span class='neg'>{html.escape(t)} {v:.3f}</span>" for t, v in r.bottom_logits]
        out.append("</div></div>")
    out.append("</body></html>")
    return "\n".join(out)


def write_dashboard(reports: list[FeatureReport], path: str | Path, *, title: str = "SAE features") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_dashboard(reports, title=title), encoding="utf-8")
    return path
