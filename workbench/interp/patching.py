"""Activation patching and attribution patching over layers x positions.

Activation patching (causal tracing, Meng et al. 2022; Heimersheim & Nanda 2024): run the corrupted prompt,
replace one activation (layer, position) with its value from the clean run, and measure how much of the
clean behaviour comes back: ``(metric(patched) - metric(corrupted)) / (metric(clean) - metric(corrupted))``.

Attribution patching (Nanda 2023, "Attribution Patching: Activation Patching At Industrial Scale")
approximates every cell at once to first order: ``(a_clean - a_corrupted) . d metric / d a`` at the corrupted
run, with one forward and one backward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from workbench.interp.arch import arch_of, get_module
from workbench.interp.cache import run_with_cache
from workbench.interp.hooks import BLOCK_KINDS, READ_ONLY, Hooks

Metric = Callable[[torch.Tensor], torch.Tensor]  # logits [batch, seq, vocab] -> [batch]


def logit_diff(correct: int, incorrect: int, position: int = -1) -> Metric:
    """Metric: logit(correct) - logit(incorrect) at one position (default: the last)."""
    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, position, correct] - logits[:, position, incorrect]
    return metric


@dataclass
class PatchingResult:
    kind: str
    layers: list[int]
    scores: torch.Tensor  # [n_layers, seq]: normalised recovery (1 = clean, 0 = corrupted)
    raw: torch.Tensor  # [n_layers, seq]: metric values (activation patching) or first-order deltas
    clean_metric: float
    corrupted_metric: float
    method: str = "activation"
    tokens: list[str] = field(default_factory=list)

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Save a layers x positions heatmap as PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        seq = self.scores.shape[1]
        fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * seq + 2), max(3.0, 0.22 * len(self.layers) + 1.5)))
        lim = float(self.scores.abs().max().clamp(min=1e-6))
        im = ax.imshow(self.scores.float().numpy(), cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
        ax.set_yticks(range(len(self.layers)), [str(i) for i in self.layers], fontsize=7)
        ax.set_xticks(range(seq), self.tokens or [str(i) for i in range(seq)], rotation=90, fontsize=7)
        ax.set(xlabel="position", ylabel="layer", title=title or f"{self.method} patching: {self.kind}")
        fig.colorbar(im, ax=ax, label="recovered fraction of clean metric")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _check(model, clean_ids, corrupted_ids, kind, layers):
    if kind not in BLOCK_KINDS or kind in READ_ONLY:
        raise ValueError(f"kind must be one of {[k for k in BLOCK_KINDS if k not in READ_ONLY]}, got {kind!r}")
    if clean_ids.ndim != 2 or clean_ids.shape[0] != 1 or clean_ids.shape != corrupted_ids.shape:
        raise ValueError("clean_ids and corrupted_ids must both be [1, seq] with the same length, got "
                         f"{tuple(clean_ids.shape)} and {tuple(corrupted_ids.shape)}")
    n_layers = len(get_module(model, arch_of(model).layers))
    layers = list(range(n_layers)) if layers is None else list(layers)
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise IndexError(f"layers {bad} out of range for a model with {n_layers} layers")
    return layers


def _baseline(model, clean_ids, corrupted_ids, metric, names):
    _, clean = run_with_cache(model, clean_ids, names=names)
    with torch.no_grad():
        m_clean = float(metric(model(clean_ids).logits)[0])
        m_corr = float(metric(model(corrupted_ids).logits)[0])
    if abs(m_clean - m_corr) < 1e-8:
        raise ValueError(f"metric is the same on clean and corrupted inputs ({m_clean:.4g}): nothing to recover")
    return clean, m_clean, m_corr


def activation_patching(model: nn.Module, clean_ids: torch.Tensor, corrupted_ids: torch.Tensor, metric: Metric, *,
                        kind: str = "hook_resid_pre", layers: list[int] | None = None,
                        batch_size: int = 16, tokenizer=None) -> PatchingResult:
    """Patch ``blocks.{layer}.{kind}`` at every (layer, position) from clean into corrupted.

    One forward per layer and ``batch_size`` positions: row r of the batch patches position r.
    """
    layers = _check(model, clean_ids, corrupted_ids, kind, layers)
    names = [f"blocks.{i}.{kind}" for i in layers]
    clean, m_clean, m_corr = _baseline(model, clean_ids, corrupted_ids, metric, names)
    seq = clean_ids.shape[1]
    raw = torch.empty(len(layers), seq)
    for li in range(len(layers)):
        src = clean[names[li]][0]
        for start in range(0, seq, batch_size):
            pos = torch.arange(start, min(seq, start + batch_size))

            def patch(act, _hook, pos=pos, src=src):
                act = act.clone()
                act[torch.arange(len(pos)), pos] = src[pos].to(act.dtype)
                return act

            with Hooks(model, [(names[li], patch)]), torch.no_grad():
                logits = model(corrupted_ids.expand(len(pos), -1)).logits
            raw[li, pos] = metric(logits).float().cpu()
    scores = (raw - m_corr) / (m_clean - m_corr)
    return PatchingResult(kind, layers, scores, raw, m_clean, m_corr, "activation", _tokens(tokenizer, clean_ids))


def attribution_patching(model: nn.Module, clean_ids: torch.Tensor, corrupted_ids: torch.Tensor, metric: Metric, *,
                         kind: str = "hook_resid_pre", layers: list[int] | None = None,
                         tokenizer=None) -> PatchingResult:
    """First-order estimate of :func:`activation_patching` for every cell from one backward pass."""
    layers = _check(model, clean_ids, corrupted_ids, kind, layers)
    names = [f"blocks.{i}.{kind}" for i in layers]
    clean, m_clean, m_corr = _baseline(model, clean_ids, corrupted_ids, metric, names)
    acts: dict[str, torch.Tensor] = {}

    def leaf(act, _hook):  # make the graph reach every activation even if the weights are frozen
        return act if act.requires_grad else act.detach().requires_grad_()

    def keep(act, hook):
        acts[hook.name] = act

    with Hooks(model, [("hook_embed", leaf), *((n, keep) for n in names)]), torch.enable_grad():
        value = metric(model(corrupted_ids).logits).sum()
        grads = torch.autograd.grad(value, [acts[n] for n in names])
    raw = torch.stack([
        ((clean[n] - acts[n].detach()) * g).flatten(2).sum(-1)[0] for n, g in zip(names, grads, strict=True)
    ]).float().cpu()
    return PatchingResult(kind, layers, raw / (m_clean - m_corr), raw, m_clean, m_corr, "attribution",
                          _tokens(tokenizer, clean_ids))


def _tokens(tokenizer, ids) -> list[str]:
    return [tokenizer.decode([int(t)]) for t in ids[0]] if tokenizer is not None else []
