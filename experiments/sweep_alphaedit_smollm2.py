"""AlphaEdit hyperparameter sweep on SmolLM2-135M: the first sequential edits, edit by edit.

The first ``--edits`` facts of the seeded shuffle ``edit_smollm2.py`` edits in sequence are applied in batches
of ``--batch`` through one :class:`workbench.surgery.Editor` per configuration (each configuration is the
model's defaults plus one set of ``--configs`` overrides). After the last batch it measures, per edit, whether
the greedy answer is the target (edits held), and the neighbourhood prompts of those facts (greedy answer
unchanged); per request it records ``delta_reached``, the fraction of the value shift δ the spread over the
layers delivers at the top layer (``EditResult.info``), and the value optimisation's final NLL. Every edit is
undone (bit-exact) before the next configuration.

Configurations are ranked by edits held, then neighbourhood kept, then the mean ``delta_reached``.

    .venv/bin/python experiments/sweep_alphaedit_smollm2.py --configs '{}' '{"l2": 3.0}' '{"spread_passes": 2}'

writes experiments/results/editing/sweep_alphaedit_smollm2.json (after each configuration) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from edit_smollm2 import sequential_order
from provenance import provenance, write_json  # experiments/ is the script's folder

OUT = Path("experiments/results/editing/sweep_alphaedit_smollm2.json")


def run_config(model, tok, order, batch: int, overrides: dict, pairs) -> dict:
    from workbench.surgery.edit import Editor
    from workbench.surgery.hparams import hparams_to_dict, load_hparams
    from workbench.surgery.metrics import evaluate_requests, score_pairs

    hp = load_hparams("alphaedit", model, overrides=overrides)
    editor = Editor(model, tok, method="alphaedit", hparams=hp, progress=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    t0, per = time.time(), []
    try:
        for start in range(0, len(order), batch):
            res = editor.apply(order[start:start + batch])
            per += [{k: q[k] for k in ("delta_reached", "nll_start", "nll", "steps", "delta_norm")}
                    for q in res.info["requests"]]
        held = [bool(r.rewrite_greedy) for r in evaluate_requests(model, tok, order).requests]
        kept = [s.exact for s in score_pairs(model, tok, pairs)]
    finally:
        editor.undo_all()
    exact = all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    if not exact:  # the next configuration would start from edited weights
        raise SystemExit(f"undo did not restore the weights bit-exactly after {overrides}")
    for row, r, h in zip(per, order, held, strict=True):
        row.update(case_id=r.case_id, edit=f"{r.subject} -> {r.target_new}", held=h)
    return {"overrides": overrides, "hparams": hparams_to_dict(hp), "seconds": time.time() - t0,
            "held": sum(held) / len(held), "neighborhood_greedy": sum(kept) / len(kept),
            "mean_delta_reached": sum(p["delta_reached"] for p in per) / len(per),
            "misses": [p["edit"] for p in per if not p["held"]], "undone_exact": exact, "per_request": per}


def rank_key(row: dict) -> tuple:
    return (row["held"], row["neighborhood_greedy"], row["mean_delta_reached"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("--facts", type=Path, default=Path("experiments/data/smollm2_facts.jsonl"))
    ap.add_argument("--edits", type=int, default=20)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0, help="the shuffle (edit_smollm2.py --seed)")
    ap.add_argument("--configs", nargs="+", default=["{}"], help="JSON overrides of the defaults, one per config")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    try:
        configs = [json.loads(c) for c in args.configs]
    except json.JSONDecodeError as e:
        ap.error(f"--configs: not JSON ({e})")
    if not all(isinstance(c, dict) for c in configs):
        ap.error("--configs: each must be a JSON object")

    import workbench
    from workbench.surgery.requests import load_requests

    torch.set_num_threads(args.threads)
    model, tok = workbench.load(args.model, device="cpu", progress=False)
    model.eval()
    order = sequential_order(load_requests(args.facts), args.seed, args.edits)
    pairs = sorted({tuple(p) for r in order for p in r.locality})
    rows: list[dict] = []
    result = {"model": args.model, "n_edits": len(order), "batch_size": args.batch, "seed": args.seed,
              "case_ids": [r.case_id for r in order], "n_neighborhood_prompts": len(pairs), "configs": rows}
    print(f"{'overrides':<48}{'held':>7}{'neigh':>7}{'reached':>9}{'s':>6}  misses")
    for overrides in configs:
        rows.append(run_config(model, tok, order, args.batch, overrides, pairs))
        r = rows[-1]
        print(f"{json.dumps(overrides):<48}{r['held']:>7.2f}{r['neighborhood_greedy']:>7.3f}"
              f"{r['mean_delta_reached']:>9.3f}{r['seconds']:>6.0f}  {'; '.join(r['misses'])}", flush=True)
        write_json(args.out, {**provenance(), **result})
    result["best"] = max(rows, key=rank_key)["overrides"]
    write_json(args.out, {**provenance(), **result})
    print(f"best: {json.dumps(result['best'])}\nwrote {args.out}")


if __name__ == "__main__":
    main()
