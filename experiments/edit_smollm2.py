"""Knowledge editing on SmolLM2-135M: ROME, MEMIT, AlphaEdit and FT on single edits, then sequential edits.

**Single edits.** Every fact of ``experiments/data/smollm2_facts.jsonl`` (or the first ``--limit``, round-robin
over relations) is edited alone with each method (``workbench.surgery.Editor``, the model's defaults file),
measured with both metric families and fluency (``workbench.surgery.metrics.evaluate_requests`` against the
unedited model) and undone. Targets checked for ROME (greedy answer = target): efficacy >= 95%, paraphrase
>= 80%, neighbourhood unchanged >= 90%.

**Sequential edits.** ``--seq-edits`` facts (seeded shuffle) are applied one batch after another with MEMIT and
with AlphaEdit (``workbench.surgery.sequential.run_sequential``); every ``--eval-every`` edits all earlier edits,
the neighbourhood prompts and the GPL-3 perplexity (``workbench.eval.perplexity`` over 256-token windows of
``/usr/share/common-licenses/GPL-3``) are measured. Targets checked for AlphaEdit after 100 edits: >= 90% of
the edits still hold, perplexity within 10% of the unedited model's.

    .venv/bin/python experiments/edit_smollm2.py                       # everything (long on a CPU)
    .venv/bin/python experiments/edit_smollm2.py --limit 5 --seq-edits 10   # a quick subset

``--hparams METHOD=JSON`` (repeatable) overrides fields of a method's defaults file in both parts; the results
files record every method's hyperparameters as run.

writes experiments/results/editing/edit_smollm2.json, sequential_smollm2.json and the PNGs edit_smollm2.png,
sequential_smollm2.png. Results are written after each method, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from provenance import provenance, write_json  # experiments/ is the script's folder
from trace_facts_smollm2 import pick

OUT = Path("experiments/results/editing")
METHODS = ("rome", "memit", "alphaedit", "ft")
SINGLE_TARGETS = {"rewrite_greedy": 0.95, "rephrase_greedy": 0.80, "neighborhood_greedy": 0.90}


def parse_overrides(items: list[str]) -> dict[str, dict]:
    """``["alphaedit={\"l2\": 3}", ...]`` -> ``{"alphaedit": {"l2": 3}}``; ValueError with the reason."""
    out: dict[str, dict] = {}
    for item in items:
        method, sep, raw = item.partition("=")
        if not sep or method not in METHODS:
            raise ValueError(f"{item!r}: expected METHOD=JSON with METHOD one of {', '.join(METHODS)}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{item!r}: not JSON ({e})") from None
        if not isinstance(value, dict):
            raise ValueError(f"{item!r}: the JSON must be an object of fields")
        out.setdefault(method, {}).update(value)
    return out


def single_edits(model, tok, reqs, methods, args, out: dict, path: Path) -> None:
    from workbench.surgery.edit import Editor
    from workbench.surgery.metrics import EditMetrics, evaluate_requests

    pre = evaluate_requests(model, tok, reqs, fluency=True, generation_tokens=args.gen_tokens)
    out["unedited"] = {k: v for k, v in pre.to_dict().items() if k != "per_request"}
    out["methods"] = {}
    for method in methods:
        editor = Editor(model, tok, method=method, hparams=args.overrides.get(method), progress=False)
        per, seconds, t0 = [], [], time.time()
        for i, r in enumerate(reqs):
            t = time.time()
            res = editor.apply([r])
            seconds.append(time.time() - t)
            try:
                per.extend(evaluate_requests(model, tok, [r], reference=pre, fluency=True,
                                             generation_tokens=args.gen_tokens).requests)
            finally:
                res.undo()
            m = per[-1]
            print(f"  {method} [{i + 1}/{len(reqs)}] {r.text!r} -> {r.target_new!r}: greedy {m.rewrite_greedy:.0f} "
                  f"para {m.rephrase_greedy or 0:.2f} neigh {m.neighborhood_greedy or 0:.2f} ({seconds[-1]:.0f} s)",
                  flush=True)
            if (i + 1) % 5 == 0 or i + 1 == len(reqs):  # an interrupted run keeps the edits measured so far
                out["methods"][method] = _row(method, editor, per, seconds, len(reqs))
                write_json(path, {**provenance(), **out})
        print(f"{method}: {time.time() - t0:.0f} s\n{EditMetrics(per, has_reference=True).table()}", flush=True)


def _row(method, editor, per, seconds, planned: int) -> dict:
    from workbench.surgery.metrics import EditMetrics

    d = EditMetrics(per, has_reference=True).to_dict()
    row = {"hparams": _hp(editor.hparams), "edits_measured": len(per), "edits_planned": planned,
           "seconds_per_edit": sum(seconds) / len(seconds), "easyedit": d["easyedit"], "rome": d["rome"],
           "greedy": d["greedy"], "per_request": d["per_request"]}
    if method == "rome":
        row["targets"] = {k: {"target": v, "measured": d["greedy"][k], "met": d["greedy"][k] >= v}
                          for k, v in SINGLE_TARGETS.items()}
    return row


def sequential_order(facts, seed: int, n: int) -> list:
    """The first ``n`` facts of the seeded shuffle the sequential runs edit, in order."""
    order = list(facts)
    random.Random(seed).shuffle(order)
    return order[:n]


def _hp(hp) -> dict:
    from workbench.surgery.hparams import hparams_to_dict

    return hparams_to_dict(hp)


def plot_single(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("greedy", "rewrite_greedy"), ("greedy", "rephrase_greedy"), ("greedy", "neighborhood_greedy"),
            ("rome", "efficacy_score"), ("rome", "paraphrase_score"), ("rome", "neighborhood_score"),
            ("easyedit", "rewrite_acc"), ("easyedit", "rephrase_acc"), ("easyedit", "locality")]
    methods = list(out["methods"])
    fig, ax = plt.subplots(figsize=(12, 3.8))
    w = 0.8 / max(1, len(methods))
    for j, m in enumerate(methods):
        vals = [out["methods"][m][f][k] or 0 for f, k in keys]
        ax.bar([i + j * w for i in range(len(keys))], vals, w, label=m)
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(keys))], [f"{f}\n{k}" for f, k in keys], fontsize=7)
    ax.set(ylim=(0, 1.05), title=f"single edits on SmolLM2-135M ({out['n_facts']} facts)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("--facts", type=Path, default=Path("experiments/data/smollm2_facts.jsonl"))
    ap.add_argument("--limit", type=int, default=None, help="facts for the single edits (default: all)")
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    ap.add_argument("--seq-methods", nargs="*", default=["memit", "alphaedit"], choices=METHODS)
    ap.add_argument("--seq-edits", type=int, default=100, help="sequential edits (0: none)")
    ap.add_argument("--seq-batch", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--gen-tokens", type=int, default=48, help="tokens generated per prompt for fluency")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--hparams", action="append", default=[], metavar="METHOD=JSON",
                    help="override fields of METHOD's defaults (repeatable)")
    args = ap.parse_args()
    from workbench.surgery.hparams import load_hparams

    try:
        args.overrides = parse_overrides(args.hparams)
        for method, fields in args.overrides.items():
            load_hparams(method, overrides=fields)  # unknown fields and bad values, before any model loads
    except ValueError as e:
        ap.error(f"--hparams: {e}")

    import workbench
    from workbench.data.windows import token_windows
    from workbench.eval.perplexity import perplexity
    from workbench.surgery.requests import load_requests
    from workbench.surgery.sequential import plot_sequential, run_sequential

    torch.set_num_threads(args.threads)
    model, tok = workbench.load(args.model, device=args.device, progress=False)
    model.eval()
    facts = load_requests(args.facts)

    if args.methods and args.limit != 0:
        reqs = pick(facts, args.limit) if args.limit else facts
        out = {"model": args.model, "facts_file": str(args.facts), "n_facts": len(reqs),
               "case_ids": [r.case_id for r in reqs], "targets_rome_greedy": SINGLE_TARGETS}
        single_edits(model, tok, reqs, args.methods, args, out, args.out / "edit_smollm2.json")
        plot_single(out, args.out / "edit_smollm2.png")

    if args.seq_edits and args.seq_methods:
        order = sequential_order(facts, args.seed, args.seq_edits)
        windows = token_windows(tok, "gpl-3", 256)
        base_ppl = perplexity(model, windows, progress=False).ppl
        seq = {"model": args.model, "n_edits": len(order), "requested_edits": args.seq_edits,
               "batch_size": args.seq_batch, "eval_every": args.eval_every,
               "ppl_text": f"GPL-3, {len(windows)} windows of 256 tokens", "unedited_ppl": base_ppl,
               "case_ids": [r.case_id for r in order], "runs": {}}
        results = []
        for method in args.seq_methods:
            t0 = time.time()

            def show(p, method=method, t0=t0):
                print(f"  {method} {p['n_edits']:>3} edits: held {p.get('retention_greedy', float('nan')):.3f} "
                      f"neigh {p.get('neighborhood_greedy', float('nan')):.3f} "
                      f"ppl {p.get('ppl', float('nan')):.3f} [{time.time() - t0:.0f} s]", flush=True)

            r = run_sequential(model, tok, order, method, batch_size=args.seq_batch, eval_every=args.eval_every,
                               hparams=args.overrides.get(method), ppl_windows=windows, on_point=show)
            results.append(r)
            last = r.points[-1]
            run = r.to_dict()
            run["final"] = {k: last.get(k) for k in ("n_edits", "retention_greedy", "efficacy_score",
                                                     "neighborhood_greedy", "locality", "ppl")}
            run["final"]["ppl_ratio"] = last["ppl"] / base_ppl
            if method == "alphaedit":
                run["targets"] = {
                    "held_after_100": {"target": 0.90, "measured": last.get("retention_greedy"),
                                       "n_edits": last["n_edits"],
                                       "met": last["n_edits"] >= 100 and last.get("retention_greedy", 0) >= 0.90},
                    "ppl_within_10pct": {"target": 1.10, "measured": run["final"]["ppl_ratio"],
                                         "n_edits": last["n_edits"],
                                         "met": last["n_edits"] >= 100 and run["final"]["ppl_ratio"] <= 1.10}}
            seq["runs"][method] = run
            write_json(args.out / "sequential_smollm2.json", {**provenance(), **seq})
            plot_sequential(results, args.out / "sequential_smollm2.png", unedited_ppl=base_ppl)
        print(f"wrote {args.out}/sequential_smollm2.json and .png")


if __name__ == "__main__":
    main()
