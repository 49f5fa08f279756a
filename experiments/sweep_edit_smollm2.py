"""ROME hyperparameter sweep on SmolLM2-135M, on facts kept apart from the evaluation set.

The evaluation set is the ``--eval-size`` facts ``edit_smollm2.py --limit N`` edits (round-robin over
relations); the sweep uses the other facts of ``experiments/data/smollm2_facts.jsonl`` (``--limit`` of them,
round-robin), so the chosen defaults are not fitted to the facts that measure them.

- **Stage 0, key specificity (no edit).** For each layer of ``--specificity-layers`` and every sweep fact:
  ROME's update adds ``ρ δ`` at a position whose key is ``k``, with ``ρ = uᵀk / uᵀk*`` and ``u = C⁻¹k*``.
  Reported: the mean ``ρ`` at the subject's last token of the bare edit prompt and of the paraphrases (the
  edit should reach them: ρ near 1) and the largest ``|ρ|`` over the positions of each neighbourhood prompt
  (it should not: ρ near 0), and their ratio. This tells which of the layers causal tracing points to keep
  subjects apart. ``--specificity-preserve N ...`` repeats it with ``u`` holding N preserved subjects fixed
  (``workbench.surgery.preserve``); ``--specificity-only`` stops after it.
- **Stage 1.** ``--reference`` layers with subject-token values (layer 6: the previous defaults), then each layer of
  ``--layers`` with each value mode of ``--values`` (``subject``: δ at the subject's last token, Meng et al.
  2022; ``update``: δ optimised through the rank-one update, ``value_through_update``).
- **Stage 2.** At the best of stage 1 (or the choice of a written sweep, ``--from-best``), one of
  ``clamp_norm_factor``, ``kl_factor``, ``v_steps`` and ``preserve_subjects`` (``--preserve``) varied at a time.

Each configuration edits every sweep fact alone (``workbench.surgery.Editor``), measures it
(``workbench.surgery.metrics.evaluate_requests`` against the unedited model) and undoes it. Configurations are
ranked by the number of ROME targets met (greedy edit >= 0.95, paraphrase >= 0.80, neighbourhood unchanged
>= 0.90), then the smallest margin above a target, then the mean of the three greedy rates, then the ROME
scores (``rank_key``). ``--rank SWEEP_JSON [...] --out RANKED_JSON`` ranks written sweeps of the same facts
together, without editing; ``--base JSON`` overrides the base configuration of stages 1-2, and
``--stats-tokens N`` the corpus tokens of the key statistics (every configuration then records them).

    .venv/bin/python experiments/sweep_edit_smollm2.py [--limit 12] [--layers 2 3 4 6]

writes experiments/results/editing/sweep_smollm2.json and prints the tables and the chosen defaults.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from edit_smollm2 import SINGLE_TARGETS
from provenance import provenance, write_json  # experiments/ is the script's folder
from trace_facts_smollm2 import pick

OUT = Path("experiments/results/editing")
BASE = {"clamp_norm_factor": 4.0, "kl_factor": 0.0625, "v_steps": 25}
VALUE_MODES = {"subject": False, "update": True}


def split(reqs, eval_size: int) -> tuple[list, list]:
    """(evaluation facts, sweep facts): the first ``eval_size`` round-robin, and the rest."""
    ev = pick(reqs, eval_size)
    ids = {r.case_id for r in ev}
    return ev, [r for r in reqs if r.case_id not in ids]


def rank_key(row: dict) -> tuple:
    """Targets met, then the smallest margin above a target (a default that clears every target by the most is
    the least likely to fall below one on other facts), then the mean greedy rate, then the ROME scores."""
    g, r = row["greedy"], row["rome"]
    rates = [g["rewrite_greedy"], g["rephrase_greedy"] or 0, g["neighborhood_greedy"] or 0]
    margins = [v - SINGLE_TARGETS[k] for k, v in zip(SINGLE_TARGETS, rates, strict=True)]
    met = sum(m >= 0 for m in margins)
    rome = (r["efficacy_score"] + (r["paraphrase_score"] or 0) + (r["neighborhood_score"] or 0)) / 3
    return (met, round(min(margins), 6), round(sum(rates) / 3, 6), round(rome, 6))


def rank_files(paths: list[Path], out: Path) -> None:
    """Rank the configurations of written sweeps (no editing; they must share their facts) and write the ranking
    and the choice to ``out``."""
    sweeps = [json.loads(p.read_text()) for p in paths]
    if len({tuple(s["case_ids"]) for s in sweeps}) != 1:
        raise SystemExit("--rank: the sweeps edit different facts; their rates do not compare")
    rows = sorted((row for s in sweeps for row in s["configs"]), key=rank_key, reverse=True)
    print(f"{'config':<104}{'met':>5}{'min margin':>12}{'mean':>8}")
    ranking = []
    for row in rows:
        met, margin, mean, rome = rank_key(row)
        ranking.append({"overrides": row["overrides"], "targets_met": met, "min_margin": margin,
                        "mean_greedy": mean, "mean_rome": rome})
        print(f"{json.dumps(row['overrides']):<104}{met:>5}{margin:>12.3f}{mean:>8.3f}")
    result = {"sources": [{"file": str(p), "commit": s.get("commit")} for p, s in zip(paths, sweeps, strict=True)],
              "n_facts": sweeps[0]["n_facts"], "targets": SINGLE_TARGETS, "ranking": ranking,
              "chosen": rows[0]["overrides"]}
    write_json(out, {**provenance(), **result})
    print(f"chosen: {json.dumps(rows[0]['overrides'])}\nwrote {out}")


def specificity(model, tok, reqs, layers, stats, prefixes, ridge: float, preserve=(0,)) -> list[dict]:
    """Stage 0 (see the module doc): per layer and number of preserved subjects, mean ρ at the edit and
    paraphrase prompts' subject and the mean over neighbourhood prompts of the largest |ρ| over their positions."""
    from workbench.surgery import preserve as P
    from workbench.surgery.compute import mlp_keys, subject_end, subject_index
    from workbench.surgery.rome import key_direction

    acc = {(layer, n): {"bare": [], "paraphrase": [], "neighbour_max": []} for layer in layers for n in preserve}
    covs = {layer: stats.second_moment(layer, ridge) for layer in layers}
    pool = P.vocab_subjects(tok) if any(preserve) else []
    for req in reqs:
        # k*: the key at the subject's last token averaged over the prefixed prompts (as the editor computes it)
        ctx = [p + req.text for p in prefixes]
        keys, _ = mlp_keys(model, tok, layers, ctx)
        last = torch.tensor([subject_index(tok, t, subject_end(req, p)) for t, p in zip(ctx, prefixes, strict=True)])
        texts = [req.text, *req.rephrase_prompts, *[p for p, _ in req.locality]]
        got, mask = mlp_keys(model, tok, layers, texts)
        n_para = len(req.rephrase_prompts)
        at_subject = []  # (row, token) of the subject's last token in the edit prompt and paraphrases
        for row, text in enumerate(texts[: 1 + n_para]):
            j = text.find(req.subject)
            if j >= 0:
                at_subject.append((row, subject_index(tok, text, j + len(req.subject))))
        subjects = P.candidates(req, pool)
        for layer in layers:
            k_star = keys[layer][torch.arange(len(ctx)), last].mean(0)
            u0 = key_direction(k_star, covs[layer])
            cand = P.template_keys(model, tok, layer, req.template, subjects) if any(preserve) else None
            for n in preserve:
                u = u0 if n == 0 else P.preserving_direction(
                    k_star, covs[layer], cand[P.most_moved(u0, cand, n)])
                rho = (got[layer] @ u.float()) * mask  # [prompts, positions]
                for row, t in at_subject:
                    acc[layer, n]["bare" if row == 0 else "paraphrase"].append(float(rho[row, t]))
                acc[layer, n]["neighbour_max"] += rho[1 + n_para:].abs().max(dim=1).values.tolist()
    rows = []
    for layer, n in acc:
        m = {k: sum(v) / len(v) for k, v in acc[layer, n].items() if v}
        m["ratio"] = m["neighbour_max"] / m["paraphrase"]
        rows.append({"layer": layer, **({"preserve_subjects": n} if n else {}), **m})
    return rows


def run_config(model, tok, reqs, reference, overrides: dict, stats) -> dict:
    from workbench.surgery.edit import Editor
    from workbench.surgery.metrics import EditMetrics, evaluate_requests

    editor = Editor(model, tok, method="rome", hparams=overrides, stats=stats, progress=False)
    per, t0, info = [], time.time(), []
    for r in reqs:
        res = editor.apply([r])
        try:
            per.extend(evaluate_requests(model, tok, [r], reference=reference).requests)
            info.append({k: res.info["requests"][0][k] for k in ("nll_start", "nll", "steps", "delta_norm")})
        finally:
            res.undo()
    m = EditMetrics(per, has_reference=True).to_dict()
    return {"overrides": overrides, "seconds": time.time() - t0, "easyedit": m["easyedit"], "rome": m["rome"],
            "greedy": m["greedy"], "value_opt": info,
            "per_request": [{"case_id": p["case_id"], **p["greedy"]} for p in m["per_request"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("--facts", type=Path, default=Path("experiments/data/smollm2_facts.jsonl"))
    ap.add_argument("--eval-size", type=int, default=60, help="facts kept for edit_smollm2.py --limit N")
    ap.add_argument("--limit", type=int, default=12, help="sweep facts (of the others)")
    ap.add_argument("--specificity-layers", type=int, nargs="*", default=list(range(13)))
    ap.add_argument("--layers", type=int, nargs="*", default=None,
                    help="stage 1 layers (default: the MLP peak region of --trace, else 4..8)")
    ap.add_argument("--values", nargs="*", default=list(VALUE_MODES), choices=list(VALUE_MODES))
    ap.add_argument("--reference", type=int, nargs="*", default=[6],
                    help="also run these layers with subject-token values first (default 6: the previous defaults)")
    ap.add_argument("--clamps", type=float, nargs="*", default=[1.0, 2.0])
    ap.add_argument("--kls", type=float, nargs="*", default=[0.5])
    ap.add_argument("--steps", type=int, nargs="*", default=[40])
    ap.add_argument("--preserve", type=int, nargs="*", default=[],
                    help="stage 2: preserve_subjects values to try (subjects held fixed; default: none)")
    ap.add_argument("--specificity-preserve", type=int, nargs="*", default=[0], metavar="N",
                    help="stage 0 also with N preserved subjects (0: the plain update; default: 0 only)")
    ap.add_argument("--specificity-only", action="store_true", help="run stage 0 only")
    ap.add_argument("--from-best", type=Path, default=None, metavar="SWEEP_JSON",
                    help="skip stage 1: start stage 2 from the chosen configuration of a written sweep or --rank "
                         "file on the same facts (rank the files together with --rank afterwards)")
    ap.add_argument("--trace", type=Path, default=OUT / "trace_smollm2.json")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="results file (default: sweep_smollm2.json in "
                    "experiments/results/editing; with --rank it must be given)")
    ap.add_argument("--base", default="{}", metavar="JSON",
                    help=f"overrides of the stages' base configuration {json.dumps(BASE)}")
    ap.add_argument("--stats-tokens", type=int, default=None,
                    help="corpus tokens of the key statistics (default: ROMEHparams' own); recorded in each config")
    ap.add_argument("--rank", type=Path, nargs="+", default=None, metavar="SWEEP_JSON",
                    help="only rank the configurations of written sweeps (on the same facts) and write the choice "
                         "to --out")
    args = ap.parse_args()
    if args.rank is not None:  # no editing: the editing flags are not read
        if args.out is None or args.out.resolve() in {r.resolve() for r in args.rank}:
            ap.error("--rank needs an --out that is not one of the ranked files")
        rank_files(args.rank, args.out)
        return
    args.out = args.out or OUT / "sweep_smollm2.json"
    if any(n < 0 for n in [*args.preserve, *args.specificity_preserve]):
        ap.error("--preserve / --specificity-preserve: counts must be >= 0")
    start = None
    if args.from_best is not None:
        try:
            start = json.loads(args.from_best.read_text())
            if "case_ids" not in start:  # a --rank file: the facts of the sweeps it ranked
                start["case_ids"] = json.loads(Path(start["sources"][0]["file"]).read_text())["case_ids"]
            start["chosen"]
        except (OSError, json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
            ap.error(f"--from-best: not a written sweep with a chosen configuration ({e})")
    try:
        base = {**BASE, **json.loads(args.base)}
    except (json.JSONDecodeError, TypeError) as e:
        ap.error(f"--base: not a JSON object ({e})")
    if set(base) != set(BASE):
        ap.error(f"--base: unknown fields {sorted(set(base) - set(BASE))}; known: {sorted(BASE)}")

    import workbench
    from workbench.surgery.compute import context_prefixes
    from workbench.surgery.hparams import ROMEHparams
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
    evaluation, rest = split(load_requests(args.facts), args.eval_size)
    reqs = pick(rest, args.limit)
    if start is not None and start["case_ids"] != [r.case_id for r in reqs]:
        raise SystemExit("--from-best: that sweep edited other facts; use the same --limit and --eval-size")
    reference = reference_predictions(model, tok, reqs)
    hp0 = ROMEHparams()
    if args.stats_tokens is not None:  # every configuration names the statistics it was run with
        hp0.stats.tokens = args.stats_tokens
        base["stats"] = {"tokens": args.stats_tokens}
    stats = compute_stats(model, tok, sorted(set(layers) | set(args.specificity_layers)), corpus=hp0.stats.corpus,
                          tokens=hp0.stats.tokens, progress=False)
    rows: list[dict] = []
    result = {"model": args.model, "n_facts": len(reqs), "case_ids": [r.case_id for r in reqs],
              "evaluation_case_ids": [r.case_id for r in evaluation], "layers": layers, "layers_from": source,
              "base": base, "configs": rows}

    t0 = time.time()
    spec_reqs = pick(rest, None)
    prefixes = context_prefixes(model, tok, hp0.n_prefixes, hp0.prefix_len, hp0.seed)
    result["specificity"] = specificity(model, tok, spec_reqs, args.specificity_layers, stats, prefixes,
                                        hp0.ridge, args.specificity_preserve) if args.specificity_layers else []
    result["specificity_facts"] = len(spec_reqs) if args.specificity_layers else 0
    print(f"stage 0: key specificity over {len(spec_reqs)} facts ({time.time() - t0:.0f} s)")
    print(f"{'layer':>6}{'preserved':>10}{'rho edit':>10}{'rho para':>10}{'|rho| neigh':>13}{'neigh/para':>12}")
    for s in result["specificity"]:
        print(f"{s['layer']:>6}{s.get('preserve_subjects', 0):>10}{s['bare']:>10.3f}{s['paraphrase']:>10.3f}"
              f"{s['neighbour_max']:>13.3f}{s['ratio']:>12.3f}")
    write_json(args.out, {**provenance(), **result})
    if args.specificity_only:
        print(f"wrote {args.out}")
        return

    def show(row):
        g, r = row["greedy"], row["rome"]
        print(f"{json.dumps(row['overrides']):<104}{g['rewrite_greedy']:>7.2f}{g['rephrase_greedy']:>7.2f}"
              f"{g['neighborhood_greedy']:>7.2f}{r['efficacy_score']:>7.2f}{r['paraphrase_score']:>7.2f}"
              f"{r['neighborhood_score']:>7.2f}{row['seconds']:>7.0f}", flush=True)

    def run(overrides):
        rows.append(run_config(model, tok, reqs, reference, overrides, stats))
        show(rows[-1])
        write_json(args.out, {**provenance(), **result})

    print(f"\nstages 1-2: ROME on {len(reqs)} facts (case ids {result['case_ids']})")
    print(f"{'config':<104}{'edit':>7}{'para':>7}{'neigh':>7}{'eff_s':>7}{'par_s':>7}{'nei_s':>7}{'s':>7}")
    if start is not None:
        best = dict(start["chosen"])
        result["stage2_from"] = {"file": str(args.from_best), "commit": start.get("commit"), "chosen": best}
    else:
        for layer in args.reference:  # subject-token values (the previous defaults at layer 6), for comparison
            run({"layer": layer, "value_through_update": False, **base})
        for layer in layers:
            for mode in args.values:
                if not (layer in args.reference and mode == "subject"):
                    run({"layer": layer, "value_through_update": VALUE_MODES[mode], **base})
        best = dict(max(rows, key=rank_key)["overrides"])
    axes = (("clamp_norm_factor", args.clamps), ("kl_factor", args.kls), ("v_steps", args.steps),
            ("preserve_subjects", args.preserve))
    for name, values in axes:
        for value in values:
            if best.get(name, 0 if name == "preserve_subjects" else None) != value:
                run({**best, name: value})
    if not rows:
        raise SystemExit("no configuration was run (every stage-2 value equals the starting configuration)")
    best = max(rows, key=rank_key)
    result["chosen"] = best["overrides"]
    result["chosen_scores"] = {"greedy": best["greedy"], "rome": best["rome"], "easyedit": best["easyedit"]}
    write_json(args.out, {**provenance(), **result})
    print(f"chosen SmolLM2 ROME defaults: {json.dumps(best['overrides'])} (layers from {source})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
