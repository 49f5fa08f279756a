"""Sequential editing: apply batches of edits one after another and measure what degrades.

    from workbench.surgery.sequential import run_sequential
    res = run_sequential(model, tok, requests, "alphaedit", batch_size=1, eval_every=10, ppl_windows=windows)
    res.points[-1]["retention_greedy"], res.to_dict(), res.plot("curves.png")

One :class:`~workbench.surgery.edit.Editor` applies the batches in order (so AlphaEdit's accumulated keys of
earlier edits carry over). Before the first edit and after every ``eval_every`` edits (and after the last) it
measures, on the model as it is then:

- **retention** over every request edited so far: ``retention_greedy`` (the edit prompt's greedy answer is still
  ``target_new``), ``efficacy_score`` (ROME's ``P(new) > P(true)``), ``rewrite_acc`` (EasyEdit), and the
  paraphrase scores;
- **locality** over the distinct neighbourhood prompts of *all* requests (their subjects are never edited):
  ``neighborhood_greedy`` (greedy answer is still the ground truth) and EasyEdit's ``locality`` (token argmax
  unchanged vs the unedited model);
- ``unedited_true_greedy``: requests not edited yet whose edit prompt still produces ``target_true``;
- ``ppl``: perplexity of ``ppl_windows`` (e.g. the GPL-3 text) through :func:`workbench.eval.perplexity`.

With ``undo=True`` (the default) every edit is undone at the end and the weights are checked to be bit-exact.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workbench.surgery.metrics import evaluate_requests, reference_predictions, score_pairs
from workbench.surgery.requests import as_requests

log = logging.getLogger(__name__)


@dataclass
class SequentialResult:
    method: str
    batch_size: int
    n_requests: int
    points: list[dict] = field(default_factory=list)  # one per evaluation, "n_edits" first
    edit_seconds: float = 0.0
    eval_seconds: float = 0.0
    undone_exact: bool | None = None
    hparams: dict | None = None  # the editor's, as a dict

    def to_dict(self) -> dict:
        return {"method": self.method, "batch_size": self.batch_size, "n_requests": self.n_requests,
                "hparams": self.hparams, "edit_seconds": self.edit_seconds, "eval_seconds": self.eval_seconds,
                "undone_exact": self.undone_exact, "points": self.points}

    def curve(self, key: str) -> tuple[list[int], list[float | None]]:
        return [p["n_edits"] for p in self.points], [p.get(key) for p in self.points]


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _point(model, tok, reqs, edited: int, reference, ppl_windows, ppl_batch) -> dict:
    done, rest = reqs[:edited], reqs[edited:]
    point: dict = {"n_edits": edited}
    if done:
        m = evaluate_requests(model, tok, done, reference=reference)
        agg = m.aggregate()
        point.update(retention_greedy=agg["greedy"]["rewrite_greedy"],
                     retention_rephrase_greedy=agg["greedy"]["rephrase_greedy"],
                     efficacy_score=agg["rome"]["efficacy_score"],
                     paraphrase_score=agg["rome"]["paraphrase_score"],
                     rewrite_acc=agg["easyedit"]["rewrite_acc"], rephrase_acc=agg["easyedit"]["rephrase_acc"],
                     held=[int(r.rewrite_greedy) for r in m.requests])
    pairs = sorted({tuple(p) for r in reqs for p in r.locality})
    if pairs:
        scores = score_pairs(model, tok, pairs)
        point["neighborhood_greedy"] = sum(s.exact for s in scores) / len(scores)
        point["locality"] = sum(
            sum(a == b for a, b in zip(s.argmax, reference[(s.prompt, s.answer)], strict=True)) / s.n
            for s in scores) / len(scores)
        point["n_neighborhood_prompts"] = len(pairs)
    true_pairs = [(r.text, r.target_true) for r in rest if r.target_true is not None]
    if true_pairs:
        point["unedited_true_greedy"] = sum(s.exact for s in score_pairs(model, tok, true_pairs)) / len(true_pairs)
    if ppl_windows is not None:
        from workbench.eval.perplexity import perplexity

        point["ppl"] = perplexity(model, ppl_windows, batch_size=ppl_batch, progress=False).ppl
    return point


def run_sequential(model, tok, requests, method: str, *, batch_size: int = 1, eval_every: int = 10,
                   hparams=None, stats=None, ppl_windows: torch.Tensor | None = None, ppl_batch: int = 4,
                   undo: bool = True, progress: bool = False, on_point=None) -> SequentialResult:
    """Apply ``requests`` in batches of ``batch_size`` with one editor; evaluate every ``eval_every`` edits.

    ``eval_every`` counts edits (requests), rounded up to whole batches. ``on_point(point)`` is called after
    each evaluation (e.g. to print progress).
    """
    from workbench.surgery.edit import Editor

    reqs = as_requests(requests)
    if batch_size < 1 or eval_every < 1:
        raise ValueError(f"batch_size and eval_every must be >= 1, got {batch_size} and {eval_every}")
    editor = Editor(model, tok, method=method, hparams=hparams, stats=stats, progress=progress)
    editor.validate(reqs)
    before = _snapshot(model) if undo else None
    reference = reference_predictions(model, tok, reqs)
    from workbench.surgery.hparams import hparams_to_dict

    res = SequentialResult(method, batch_size, len(reqs), hparams=hparams_to_dict(editor.hparams))

    def evaluate(edited):
        t = time.perf_counter()
        p = _point(model, tok, reqs, edited, reference, ppl_windows, ppl_batch)
        res.eval_seconds += time.perf_counter() - t
        res.points.append(p)
        log.info("%s after %d edits: %s", method, edited, {k: v for k, v in p.items() if k != "held"})
        if on_point is not None:
            on_point(p)

    evaluate(0)
    edited, last_eval = 0, 0
    try:
        for start in range(0, len(reqs), batch_size):
            batch = reqs[start:start + batch_size]
            t = time.perf_counter()
            editor.apply(batch)
            res.edit_seconds += time.perf_counter() - t
            edited += len(batch)
            if edited - last_eval >= eval_every or edited == len(reqs):
                evaluate(edited)
                last_eval = edited
    finally:
        if undo:
            editor.undo_all()
            after = dict(model.named_parameters())
            res.undone_exact = all(torch.equal(after[n].detach(), v) for n, v in before.items())
            if not res.undone_exact:
                log.warning("weights differ from the unedited model after undoing %d edits", edited)
    return res


def plot_sequential(results: list[SequentialResult], path, unedited_ppl: float | None = None) -> Path:
    """Degradation curves (retention, locality, perplexity) of one or more runs as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = [("retention_greedy", "edits still held (greedy)"), ("neighborhood_greedy", "neighbourhood unchanged"),
              ("ppl", "GPL-3 perplexity")]
    for ax, (key, title) in zip(axes, panels, strict=True):
        for r in results:
            xs, ys = r.curve(key)
            pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=".", label=f"{r.method} (batch {r.batch_size})")
        if key == "ppl" and unedited_ppl is not None:
            ax.axhline(unedited_ppl * 1.1, color="grey", ls="--", lw=0.8, label="+10% of unedited")
        ax.set(xlabel="sequential edits", title=title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
