"""ROME hyperparameter sweep on SmolLM2-135M: layer, then clamp / KL factor / steps at the best layer.

On a subset of the fact set (round-robin over relations), each configuration edits every fact alone (ROME,
``workbench.surgery.Editor``), measures it (``workbench.surgery.metrics.evaluate_requests`` against the
unedited model) and undoes it. Stage 1 tries each layer of ``--layers`` (default: the MLP peak region of
``trace_smollm2.json``, else 4..8) at the defaults; stage 2 varies one of ``clamp_norm_factor``, ``kl_factor``
and ``v_steps`` at a time at the best layer. Configurations are ranked by the mean of the three greedy rates
(edit prompt, paraphrases, neighbourhood unchanged), ties broken by the ROME scores.

    .venv/bin/python experiments/sweep_edit_smollm2.py [--limit 20] [--layers 4 6 8]

writes experiments/results/editing/sweep_smollm2.json and prints a table and the chosen defaults.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from provenance import provenance, write_json  # experiments/ is the script's folder
from trace_facts_smollm2 import pick

OUT = Path("experiments/results/editing")
BASE = {"clamp_norm_factor": 4.0, "kl_factor": 0.0625, "v_steps": 25}


def rank_key(row: dict) -> tuple:
    g, r = row["greedy"], row["rome"]
    greedy = (g["rewrite_greedy"] + (g["rephrase_greedy"] or 0) + (g["neighborhood_greedy"] or 0)) / 3
    rome = (r["efficacy_score"] + (r["paraphrase_score"] or 0) + (r["neighborhood_score"] or 0)) / 3
    return (round(greedy, 6), round(rome, 6))


def run_config(model, tok, reqs, reference, overrides: dict, stats) -> dict:
    from workbench.surgery.edit import Editor
    from workbench.surgery.metrics import evaluate_requests

    editor = Editor(model, tok, method="rome", hparams=overrides, stats=stats, progress=False)
    per, t0, info = [], time.time(), []
    for r in reqs:
        res = editor.apply([r])
        try:
            per.extend(evaluate_requests(model, tok, [r], reference=reference).requests)
            info.append({k: res.info["requests"][0][k] for k in ("nll_start", "nll", "steps", "delta_norm")})
        finally:
            res.undo()
    from workbench.surgery.metrics import EditMetrics

    m = EditMetrics(per, has_reference=True).to_dict()
    return {"overrides": overrides, "seconds": time.time() - t0, "easyedit": m["easyedit"], "rome": m["rome"],
            "greedy": m["greedy"], "value_opt": info,
            "per_request": [{"case_id": p["case_id"], **p["greedy"]} for p in m["per_request"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("--facts", type=Path, default=Path("experiments/data/smollm2_facts.jsonl"))
    ap.add_argument("--limit", type=int, default=20, help="facts in the subset")
    ap.add_argument("--layers", type=int, nargs="*", default=None)
    ap.add_argument("--clamps", type=float, nargs="*", default=[2.0, 8.0])
    ap.add_argument("--kls", type=float, nargs="*", default=[0.5])
    ap.add_argument("--steps", type=int, nargs="*", default=[10])
    ap.add_argument("--trace", type=Path, default=OUT / "trace_smollm2.json")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT / "sweep_smollm2.json")
    args = ap.parse_args()

    import workbench
    from workbench.surgery.metrics import reference_predictions
    from workbench.surgery.requests import load_requests
    from workbench.surgery.stats import compute_stats

    torch.set_num_threads(args.threads)
    model, tok = workbench.load(args.model, device=args.device, progress=False)
    model.eval()
    layers = args.layers
    source = "--layers"
    if layers is None and args.trace.is_file():
        layers, source = json.loads(args.trace.read_text())["mlp_peak_region"], str(args.trace)
    if not layers:
        layers, source = [4, 5, 6, 7, 8], "fallback"
    reqs = pick(load_requests(args.facts), args.limit)
    reference = reference_predictions(model, tok, reqs)
    variants = ([("clamp_norm_factor", c) for c in args.clamps] + [("kl_factor", k) for k in args.kls]
                + [("v_steps", s) for s in args.steps])
    stats = compute_stats(model, tok, sorted(set(layers)), progress=False)
    rows = []
    result = {"model": args.model, "n_facts": len(reqs), "case_ids": [r.case_id for r in reqs],
              "layers": layers, "layers_from": source, "base": BASE, "configs": rows}

    def show(row):
        g, r = row["greedy"], row["rome"]
        print(f"{json.dumps(row['overrides']):<58}{g['rewrite_greedy']:>8.2f}{g['rephrase_greedy']:>8.2f}"
              f"{g['neighborhood_greedy']:>8.2f}{r['efficacy_score']:>8.2f}{r['paraphrase_score']:>8.2f}"
              f"{r['neighborhood_score']:>8.2f}{row['seconds']:>8.0f}", flush=True)

    print(f"{'config':<58}{'edit':>8}{'para':>8}{'neigh':>8}{'eff_s':>8}{'par_s':>8}{'nei_s':>8}{'s':>8}")
    for layer in layers:
        rows.append(run_config(model, tok, reqs, reference, {"layer": layer, **BASE}, stats))
        show(rows[-1])
        write_json(args.out, {**provenance(), **result})
    best_layer = max(rows, key=rank_key)["overrides"]["layer"]
    for name, value in variants:
        if BASE[name] == value:
            continue
        rows.append(run_config(model, tok, reqs, reference, {"layer": best_layer, **BASE, name: value}, stats))
        show(rows[-1])
        write_json(args.out, {**provenance(), **result})
    best = max(rows, key=rank_key)
    result["chosen"] = best["overrides"]
    result["chosen_scores"] = {"greedy": best["greedy"], "rome": best["rome"], "easyedit": best["easyedit"]}
    write_json(args.out, {**provenance(), **result})
    print(f"chosen SmolLM2 ROME defaults: {json.dumps(best['overrides'])} (layers from {source})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
