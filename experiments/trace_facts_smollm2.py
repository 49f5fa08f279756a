"""Causal tracing of the fact set on SmolLM2-135M: where do MLPs at the last subject token carry the fact?

For a sample of facts from ``experiments/data/smollm2_facts.jsonl`` (spread over the relations), two
corruptions of the subject:

1. **Gaussian noise** (Meng et al. 2022, "causal tracing"): noise of ``--noise`` x the standard deviation of
   the embedding matrix is added to the subject tokens' embeddings (``--samples`` draws per fact). The
   *indirect effect* of a component is ``P(true | corrupted, component restored) - P(true | corrupted)``, where
   P is the probability of the first token of the true answer at the last position and "restored" puts back
   the clean run's output at the last subject token: the MLP output of one layer (``mlp``), of a window of
   ``--window`` layers centred on it (``mlp_window``, as in ROME's figures), or the attention output of such a
   window (``attn_window``).
2. **Different subject** (activation patching, ``workbench.interp.activation_patching``): the subject is
   replaced by the subject of another fact of the same relation with another answer and the same token count;
   ``kind="hook_mlp_out"`` patched cell by cell from the clean run; the score is the recovered fraction of the
   clean-vs-corrupted difference in P(true), read at the last subject token.

    .venv/bin/python experiments/trace_facts_smollm2.py [--limit 4 | --cases 0 8 16]

writes experiments/results/editing/trace_smollm2.json and trace_smollm2.png (average curves per layer) and
trace_example_mlp.png (the activation-patching heatmap of the first traced fact).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from provenance import provenance, write_json  # experiments/ is the script's folder

OUT = Path("experiments/results/editing")


def subject_span(tok, text: str, subject: str) -> tuple[int, int]:
    """[first, last] token index of the (first occurrence of the) subject in ``text``."""
    start = text.index(subject)
    end = start + len(subject)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    idx = [j for j, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start]
    return idx[0], idx[-1]


def pick(reqs, n: int | None):
    """Up to ``n`` requests (all when None), round-robin over relations (one edit template per relation)."""
    if n is None:
        return list(reqs)
    groups: dict[str, list] = {}
    for r in reqs:
        groups.setdefault(r.template, []).append(r)
    queues = [list(g) for g in groups.values()]
    out = []
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


@torch.no_grad()
def trace_noise(model, ids, span, true_id, *, layers, window, noise, samples, seed):
    """Indirect effects per layer for restoring mlp / mlp window / attention window at the last subject token."""
    from workbench.interp.hooks import Hooks

    first, last = span
    emb = model.get_input_embeddings().weight
    scale = noise * float(emb.std())
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(samples, last - first + 1, emb.shape[1], generator=g) * scale
    batch = ids.expand(samples, -1)

    def add_noise(act, _hook):
        act = act.clone()
        act[:, first:last + 1] += eps.to(act.dtype)
        return act

    names = [f"blocks.{i}.{k}" for i in layers for k in ("hook_mlp_out", "hook_attn_out")]
    from workbench.interp import run_with_cache

    out, clean = run_with_cache(model, ids, names=names)
    p_clean = float(torch.softmax(out.logits[0, -1].float(), -1)[true_id])

    def p_true(extra):
        with Hooks(model, [("hook_embed", add_noise), *extra]):
            out = model(batch).logits[:, -1].float()
        return float(torch.softmax(out, -1)[:, true_id].mean())

    def restore(name):
        src = clean[name][0, last]

        def fn(act, _hook):
            act = act.clone()
            act[:, last] = src.to(act.dtype)
            return act
        return (name, fn)

    p_corr = p_true([])
    res = {"mlp": [], "mlp_window": [], "attn_window": []}
    n = len(layers)
    for li in layers:
        win = [j for j in range(li - window // 2, li - window // 2 + window) if 0 <= j < n]
        res["mlp"].append(p_true([restore(f"blocks.{li}.hook_mlp_out")]) - p_corr)
        res["mlp_window"].append(p_true([restore(f"blocks.{j}.hook_mlp_out") for j in win]) - p_corr)
        res["attn_window"].append(p_true([restore(f"blocks.{j}.hook_attn_out") for j in win]) - p_corr)
    return p_clean, p_corr, res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("--facts", type=Path, default=Path("experiments/data/smollm2_facts.jsonl"))
    ap.add_argument("--limit", type=int, default=24, help="number of facts traced")
    ap.add_argument("--cases", type=int, nargs="*", default=None, help="trace these case ids instead")
    ap.add_argument("--samples", type=int, default=10, help="noise draws per fact")
    ap.add_argument("--noise", type=float, default=3.0, help="noise std in units of the embedding std")
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT / "trace_smollm2.json")
    args = ap.parse_args()

    import workbench
    from workbench.interp import activation_patching
    from workbench.surgery.requests import load_requests, prompt_ids, target_ids

    torch.set_num_threads(args.threads)
    model, tok = workbench.load(args.model, device="cpu", progress=False)
    model.eval()
    reqs = load_requests(args.facts)
    sample = [r for r in reqs if r.case_id in args.cases] if args.cases else pick(reqs, args.limit)
    n_layers = model.config.num_hidden_layers
    layers = list(range(n_layers))
    rows, t0 = [], time.time()
    example_plotted = False
    for k, r in enumerate(sample):
        text = r.text
        ids = torch.tensor([prompt_ids(tok, text)])
        span = subject_span(tok, text, r.subject)
        true_id = target_ids(tok, text, r.target_true)[0]
        p_clean, p_corr, ie = trace_noise(model, ids, span, true_id, layers=layers, window=args.window,
                                          noise=args.noise, samples=args.samples, seed=args.seed + k)
        row = {"case_id": r.case_id, "prompt": text, "subject": r.subject, "target_true": r.target_true,
               "subject_tokens": list(span), "tokens": [tok.decode([int(t)]) for t in ids[0]],
               "noise": {"p_clean": p_clean, "p_corrupted": p_corr, **ie}}
        # a different subject of the same relation (another answer), same token count
        swap = next((o for o in reqs if o.target_true != r.target_true and o.template == r.template
                     and len(prompt_ids(tok, o.text)) == ids.shape[1]
                     and subject_span(tok, o.text, o.subject) == span), None)
        if swap is not None:
            corrupt = torch.tensor([prompt_ids(tok, swap.text)])

            def metric(logits, true_id=true_id):
                return torch.softmax(logits[:, -1].float(), -1)[:, true_id]

            act = activation_patching(model, ids, corrupt, metric, kind="hook_mlp_out", tokenizer=tok)
            row["swap"] = {"corrupted_prompt": swap.text, "p_clean": act.clean_metric,
                           "p_corrupted": act.corrupted_metric,
                           "last_subject_token": act.scores[:, span[1]].tolist(),
                           "last_token": act.scores[:, -1].tolist()}
            if not example_plotted:
                act.plot(args.out.parent / "trace_example_mlp.png",
                         title=f"MLP-output patching: {text!r} vs {swap.text!r}")
                example_plotted = True
        rows.append(row)
        peak = max(range(n_layers), key=lambda i: ie["mlp_window"][i])
        print(f"[{k + 1}/{len(sample)}] {text!r} -> {r.target_true!r}: P clean {p_clean:.3f} corrupted {p_corr:.3f}"
              f", mlp-window peak L{peak} (+{ie['mlp_window'][peak]:.3f}){'' if swap else ', no swap subject'}"
              f" [{time.time() - t0:.0f} s]")

    def avg(key, sub):
        vals = [row[key][sub] for row in rows if key in row]
        return [sum(v[i] for v in vals) / len(vals) for i in range(n_layers)] if vals else None

    summary = {"noise_" + s: avg("noise", s) for s in ("mlp", "mlp_window", "attn_window")}
    summary["swap_last_subject_token"] = avg("swap", "last_subject_token")
    summary["swap_last_token"] = avg("swap", "last_token")
    peaks = {k: (max(range(n_layers), key=lambda i, v=v: v[i]) if v else None) for k, v in summary.items()}
    mlp1 = summary["noise_mlp"]
    top = max(mlp1)
    region = [i for i in range(n_layers) if mlp1[i] >= 0.5 * top]
    result = {"model": args.model, "facts_file": str(args.facts), "n_traced": len(rows),
              "n_with_swap": sum("swap" in r for r in rows), "settings": {
                  "samples": args.samples, "noise": args.noise, "window": args.window, "seed": args.seed},
              "mean_p_clean": sum(r["noise"]["p_clean"] for r in rows) / len(rows),
              "mean_p_corrupted": sum(r["noise"]["p_corrupted"] for r in rows) / len(rows),
              "average": summary, "peak_layer": peaks,
              "mlp_peak_region": region, "seconds": time.time() - t0, "facts": rows}
    write_json(args.out, {**provenance(), **result})

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for key, lab in (("noise_mlp", "MLP (1 layer)"), ("noise_mlp_window", f"MLP ({args.window}-layer window)"),
                     ("noise_attn_window", f"attention ({args.window}-layer window)")):
        a1.plot(layers, summary[key], marker=".", label=lab)
    a1.set(xlabel="layer (centre of window)", ylabel="indirect effect on P(true)",
           title=f"noise corruption, last subject token ({len(rows)} facts)")
    a1.legend(fontsize=8)
    if summary["swap_last_subject_token"]:
        a2.plot(layers, summary["swap_last_subject_token"], marker=".", label="last subject token")
        a2.plot(layers, summary["swap_last_token"], marker=".", label="last token")
        a2.legend(fontsize=8)
    a2.set(xlabel="layer", ylabel="recovered fraction of P(true)",
           title=f"subject swap, MLP output patched ({result['n_with_swap']} facts)")
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)
    plt.close(fig)
    print(f"peaks: {peaks}; MLP (1 layer) region >= half the peak: {region}")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
