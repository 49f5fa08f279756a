"""Hallucination detectors on SmolLM2-135M-Instruct over the closed-book QA set.

Stages (each resumable: finished questions are kept under ``--work-dir`` and skipped when run again):

1. ``greedy``: the main answer to every question of ``experiments/data/closed_book_qa.jsonl``, greedy, at most
   16 new tokens, stopping at a newline (``workbench.hallucination.generate_answers``: chat template, the
   short-answer system instruction and three worked examples), with per-token log-probabilities and
   entropies and the residual stream after every block at the ``tbg`` and ``slt`` positions;
2. ``ptrue``: P(True) of each greedy answer (``workbench.hallucination.p_true``);
3. ``samples``: 10 answers per question at temperature 1, top-k 50 (``SemanticEntropyConfig`` defaults);
   ``lm-judge`` (optional, not in the default stages): the LM entailment judge on ``--lm-judge-pairs``
   (greedy answer, gold answer) pairs, both directions, compared with the correctness rule in the eval stage;
4. ``eval``: correctness (a normalised alias as a whole-word span of the normalised answer; the stricter prefix
   rule alongside), every detector's score, AUROC and AURAC with 95% bootstrap intervals (``--n-boot``
   resamples of the questions), the paired bootstrap interval of probe minus token-entropy AUROC, and the ROC
   plot. Semantic entropy clusters with the exact-match judge. The probe (target: wrong answer; position tbg;
   layer and C chosen by inner 3-fold cross-validation) is scored out of fold, 5-fold stratified over
   questions, so no question's score comes from a probe trained on it; supplementary rows: the probe at slt,
   the semantic-entropy probe (target: semantic entropy above the :func:`binarize_entropy` threshold, no
   correctness labels) and mean token entropy.

Target checked: probe AUROC >= 0.7 and >= the token-entropy AUROC.

    .venv/bin/python experiments/hallucination_smollm2.py                 # every stage, 1 torch thread
    .venv/bin/python experiments/hallucination_smollm2.py --stages greedy --limit 40   # a quick subset

writes experiments/results/hallucination_smollm2.json and hallucination_smollm2_roc.png; the eval stage runs on
the questions every stage has finished, and the JSON says how many that is.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from provenance import provenance, write_json  # experiments/ is the script's folder

QA = Path("experiments/data/closed_book_qa.jsonl")
OUT = Path("experiments/results")
STAGES = ("greedy", "ptrue", "samples", "lm-judge", "eval")
TARGET_AUROC = 0.7


def read_jsonl(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for n, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n != len(lines) - 1:
                raise
            print(f"{path}: ignoring a truncated last line (an interrupted write); it is redone", flush=True)
    return {r["id"]: r for r in rows}


def append_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else ""
    if text and not text.endswith("\n"):  # drop a truncated last line before appending
        path.write_text(text[: text.rfind("\n") + 1])
    with path.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def add_time(work: Path, stage: str, seconds: float, n: int) -> None:
    p = work / "timing.json"
    t = json.loads(p.read_text()) if p.exists() else {}
    s = t.setdefault(stage, {"seconds": 0.0, "questions": 0})
    s["seconds"] += seconds
    s["questions"] += n
    p.write_text(json.dumps(t, indent=2))


def stage_greedy(engine, items, work: Path, batch: int) -> None:
    from workbench.hallucination import AnswerConfig, generate_answers

    done = read_jsonl(work / "greedy.jsonl")
    todo = [it for it in items if it.id not in done]
    cfg = AnswerConfig(batch_size=batch)
    for b in range(0, len(todo), batch):
        part = todo[b: b + batch]
        t = time.time()
        gens = generate_answers(engine, [it.question for it in part], cfg)
        dt = time.time() - t
        feats = {}
        for it, g in zip(part, gens, strict=True):
            for pos, arr in g.features.items():
                feats[f"{it.id}|{pos}"] = arr.astype(np.float32)
        np.savez(work / "features" / f"{part[0].id}.npz", **feats)
        append_jsonl(work / "greedy.jsonl", [{"id": it.id, **g.to_json()} for it, g in zip(part, gens, strict=True)])
        add_time(work, "greedy", dt, len(part))
        print(f"greedy {len(done) + b + len(part)}/{len(items)} ({dt:.1f} s): "
              + "; ".join(f"{it.question[:30]!r} -> {g.answer[:24]!r}" for it, g in list(zip(part, gens, strict=True))[:2]),
              flush=True)


def stage_ptrue(engine, items, work: Path, batch: int) -> None:
    from workbench.hallucination import p_true

    greedy = read_jsonl(work / "greedy.jsonl")
    done = read_jsonl(work / "ptrue.jsonl")
    todo = [it for it in items if it.id in greedy and it.id not in done]
    for b in range(0, len(todo), batch):
        part = todo[b: b + batch]
        t = time.time()
        p = p_true(engine, [it.question for it in part], [greedy[it.id]["text"].strip() for it in part])
        add_time(work, "ptrue", time.time() - t, len(part))
        append_jsonl(work / "ptrue.jsonl", [{"id": it.id, "p_true": float(x)} for it, x in zip(part, p, strict=True)])
        print(f"p-true {len(done) + b + len(part)}/{len(todo) + len(done)}", flush=True)


def stage_samples(engine, items, work: Path, per_call: int) -> None:
    from workbench.hallucination import SemanticEntropyConfig
    from workbench.hallucination.semantic import SemanticEntropy

    greedy = read_jsonl(work / "greedy.jsonl")
    done = read_jsonl(work / "samples.jsonl")
    todo = [it for it in items if it.id in greedy and it.id not in done]
    det = SemanticEntropy(engine, None, SemanticEntropyConfig(batch_prompts=per_call))
    for b in range(0, len(todo), per_call):
        part = todo[b: b + per_call]
        t = time.time()
        samples = det.sample([greedy[it.id]["prompt_ids"] for it in part])
        dt = time.time() - t
        add_time(work, "samples", dt, len(part))
        append_jsonl(work / "samples.jsonl", [{"id": it.id, "samples": [s.to_json() for s in ss]}
                                             for it, ss in zip(part, samples, strict=True)])
        print(f"samples {len(done) + b + len(part)}/{len(todo) + len(done)} ({dt:.1f} s): {part[0].question[:30]!r} "
              f"-> {[s.answer[:12] for s in samples[0][:5]]}", flush=True)


def stage_lm_judge(engine, items, work: Path, n: int) -> None:
    """The LM judge on (greedy answer, canonical gold answer) pairs of the first ``n`` answered questions, both
    directions; its equivalence is compared with the exact-match correctness rule in the eval stage."""
    from workbench.hallucination import LMJudge

    greedy = read_jsonl(work / "greedy.jsonl")
    done = read_jsonl(work / "lm_judge.jsonl")
    todo = [it for it in items if it.id in greedy and it.id not in done][: max(0, n - len(done))]
    judge = LMJudge(engine)
    for b in range(0, len(todo), 8):
        part = todo[b: b + 8]
        t = time.time()
        rows = []
        for it in part:
            a = greedy[it.id]["text"].strip()
            lp = judge.label_logprobs(it.question, [a, it.answers[0]], [it.answers[0], a])
            lab = lp.argmax(-1).tolist()
            rows.append({"id": it.id, "labels": lab, "equivalent": lab == [2, 2],
                         "label_probs": [[round(float(x), 4) for x in r] for r in lp.exp()]})
        add_time(work, "lm_judge", time.time() - t, len(part))
        append_jsonl(work / "lm_judge.jsonl", rows)
        print(f"lm judge {len(done) + b + len(part)}/{len(done) + len(todo)}", flush=True)


def lm_judge_summary(items, work: Path, greedy: dict) -> dict | None:
    rows = read_jsonl(work / "lm_judge.jsonl")
    if not rows:
        return None
    by_id = {it.id: it for it in items}
    ref = np.array([by_id[i].correct(greedy[i]["text"]) for i in rows])
    eq = np.array([r["equivalent"] for r in rows.values()])
    labels = np.array([lab for r in rows.values() for lab in r["labels"]])
    return {"pairs": len(rows), "what": "(greedy answer, canonical gold answer), both directions, strict",
            "agreement_with_correctness_rule": float((ref == eq).mean()),
            "judged_equivalent": int(eq.sum()), "correct_by_rule": int(ref.sum()),
            "both_equivalent_and_correct": int((eq & ref).sum()),
            "directional_label_fractions": {w: float((labels == k).mean())
                                            for k, w in enumerate(("contradiction", "neutral", "entailment"))}}


def load_features(work: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted((work / "features").glob("*.npz")):
        with np.load(f) as z:
            out.update({k: z[k] for k in z.files})
    return out


def metric_block(y_hall, correct, scores, n_boot, seed=0) -> dict:
    from workbench.hallucination import aurac, auroc, bootstrap_ci

    return {"auroc": bootstrap_ci(auroc, y_hall, scores, n_boot=n_boot, seed=seed).to_dict(),
            "aurac": bootstrap_ci(aurac, correct, scores, n_boot=n_boot, seed=seed).to_dict()}


def stage_eval(items, work: Path, args) -> dict:
    from workbench.hallucination import (
        ExactMatchJudge,
        Generation,
        ProbeConfig,
        Sample,
        SemanticEntropyConfig,
        analyse_samples,
        aurac_oracle,
        auroc,
        binarize_entropy,
        bootstrap_diff,
        cross_validated_scores,
        is_correct_prefix,
        make_detector,
    )
    from workbench.hallucination.generation import AnswerConfig

    greedy, ptrue, samples = (read_jsonl(work / f) for f in ("greedy.jsonl", "ptrue.jsonl", "samples.jsonl"))
    feats = load_features(work)
    ready = [it for it in items if it.id in greedy and it.id in ptrue and it.id in samples]
    if len(ready) < 20:
        raise SystemExit(f"only {len(ready)} questions have finished every stage; run the other stages first")
    gens = [Generation.from_json(greedy[it.id], {p: feats[f"{it.id}|{p}"] for p in ("tbg", "slt")}) for it in ready]
    correct = np.array([it.correct(g.text) for it, g in zip(ready, gens, strict=True)], dtype=int)
    correct_prefix = np.array([is_correct_prefix(g.text, it.answers) for it, g in zip(ready, gens, strict=True)],
                              dtype=int)
    y = 1 - correct
    t0 = time.time()
    judge = ExactMatchJudge()
    se = [analyse_samples(it.question, [Sample.from_json(s) for s in samples[it.id]["samples"]], judge)
          for it in ready]
    scores = {
        "token-logprob": make_detector("token-logprob").score(gens),
        "token-entropy": make_detector("token-entropy").score(gens),
        "semantic-entropy": np.array([r.entropy for r in se]),
        "semantic-entropy-discrete": np.array([r.discrete_entropy for r in se]),
        "p-true": 1.0 - np.array([ptrue[it.id]["p_true"] for it in ready]),
    }
    layers = tuple(range(0, gens[0].features["tbg"].shape[0], args.layer_step))
    pcfg = ProbeConfig(position="tbg", layers=layers)
    scores["probe"], folds_tbg = cross_validated_scores(gens, y, pcfg, folds=args.folds)
    supp = {"token-entropy (mean)": make_detector("token-entropy", reduce="mean").score(gens)}
    supp["probe (slt)"], folds_slt = cross_validated_scores(gens, y, ProbeConfig(position="slt", layers=layers),
                                                            folds=args.folds)
    se_labels, se_thr = binarize_entropy(scores["semantic-entropy"])
    supp["semantic-entropy probe (tbg)"], folds_sep = cross_validated_scores(
        gens, se_labels, ProbeConfig(position="tbg", layers=layers, target="high-semantic-entropy"), folds=args.folds)
    probe_seconds = time.time() - t0

    detectors = {k: metric_block(y, correct, s, args.n_boot) for k, s in scores.items()}
    supplementary = {k: metric_block(y, correct, s, args.n_boot) for k, s in supp.items()}
    diff = bootstrap_diff(auroc, y, scores["probe"], scores["token-entropy"], n_boot=args.n_boot).to_dict()
    prefix_rule = {k: float(auroc(1 - correct_prefix, s)) for k, s in scores.items()
                   if k != "probe" and 0 < correct_prefix.sum() < len(correct_prefix)}
    probe_auroc = detectors["probe"]["auroc"]["point"]
    te_auroc = detectors["token-entropy"]["auroc"]["point"]
    by_cat: dict[str, list[int]] = {}
    for it, c in zip(ready, correct, strict=True):
        by_cat.setdefault(it.category, []).append(int(c))
    timing = json.loads((work / "timing.json").read_text()) if (work / "timing.json").exists() else {}
    timing["eval_clustering_and_probes_seconds"] = probe_seconds
    out = {
        "model": "smollm2-135m-instruct",
        "dtype": "float32",
        "threads": args.threads,
        "qa_file": str(QA),
        "n_questions": len(items),
        "n_evaluated": len(ready),
        "complete": len(ready) == len(items),
        "answer_config": asdict(AnswerConfig()),
        "semantic_entropy_config": asdict(SemanticEntropyConfig()),
        "semantic_entropy_judge": "exact-match",
        "probe": {"target": "hallucinated (wrong answer)", "position": "tbg", "candidate_layers": list(layers),
                  "Cs": list(pcfg.Cs), "inner_folds": pcfg.inner_folds, "outer_folds": args.folds,
                  "folds": folds_tbg, "folds_slt": folds_slt, "folds_semantic_entropy_probe": folds_sep,
                  "semantic_entropy_threshold": se_thr, "semantic_entropy_high_fraction": float(se_labels.mean())},
        "correctness_rule": "a normalised gold alias occurs as a whole-word span of the normalised answer "
                            "(workbench.hallucination.qa.is_correct)",
        "accuracy": float(correct.mean()),
        "accuracy_prefix_rule": float(correct_prefix.mean()),
        "rule_agreement": float((correct == correct_prefix).mean()),
        "accuracy_by_category": {k: {"n": len(v), "accuracy": float(np.mean(v))} for k, v in by_cat.items()},
        "aurac_oracle": aurac_oracle(correct),
        "n_boot": args.n_boot,
        "detectors": detectors,
        "supplementary": supplementary,
        "auroc_prefix_rule": prefix_rule,
        "probe_minus_token_entropy_auroc": diff,
        "targets": {"probe_auroc": probe_auroc, "token_entropy_auroc": te_auroc,
                    "probe_auroc_at_least_0.7": probe_auroc >= TARGET_AUROC,
                    "probe_at_least_token_entropy": probe_auroc >= te_auroc,
                    "met": probe_auroc >= TARGET_AUROC and probe_auroc >= te_auroc},
        "lm_judge_check": lm_judge_summary(items, work, greedy),
        "timing": timing,
        "per_question": [
            {"id": it.id, "question": it.question, "answer": g.answer, "gold": it.answers[0], "correct": int(c),
             "finish_reason": g.finish_reason, "n_clusters": len(set(r.cluster_ids)),
             **{k: round(float(s[i]), 5) for k, s in {**scores, **supp}.items()}}
            for i, (it, g, c, r) in enumerate(zip(ready, gens, correct, se, strict=True))],
    }
    plot_roc(y, scores, detectors, args.out / "hallucination_smollm2_roc.png", len(ready), float(correct.mean()))
    return out


def plot_roc(y, scores, detectors, path: Path, n: int, acc: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from workbench.hallucination import roc_curve

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, s in scores.items():
        fpr, tpr = roc_curve(y, s)
        a = detectors[name]["auroc"]
        ax.plot(fpr, tpr, label=f"{name}: {a['point']:.3f} [{a['low']:.3f}, {a['high']:.3f}]")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set_xlabel("false-positive rate (right answers flagged)")
    ax.set_ylabel("true-positive rate (wrong answers flagged)")
    ax.set_title(f"SmolLM2-135M-Instruct, closed-book QA\n{n} questions, accuracy {acc:.1%}", fontsize=10)
    ax.legend(fontsize=7.5, loc="lower right", title="AUROC [95% CI]", title_fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(out: dict) -> None:
    print(f"\n{out['n_evaluated']} questions, accuracy {out['accuracy']:.3f} (prefix rule {out['accuracy_prefix_rule']:.3f})")
    print(f"{'detector':32s} {'AUROC [95% CI]':26s} {'AURAC [95% CI]':26s}")
    for group in ("detectors", "supplementary"):
        for k, v in out[group].items():
            a, r = v["auroc"], v["aurac"]
            print(f"{k:32s} {a['point']:.3f} [{a['low']:.3f}, {a['high']:.3f}]     "
                  f"{r['point']:.3f} [{r['low']:.3f}, {r['high']:.3f}]")
    d, t = out["probe_minus_token_entropy_auroc"], out["targets"]
    print(f"probe - token-entropy AUROC: {d['point']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]; AURAC oracle "
          f"{out['aurac_oracle']:.3f}")
    print(f"target (probe AUROC >= 0.7 and >= token-entropy): {'met' if t['met'] else 'missed'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=["greedy", "ptrue", "samples", "eval"])
    ap.add_argument("--lm-judge-pairs", type=int, default=100, help="pairs for the lm-judge stage")
    ap.add_argument("--limit", type=int, default=None, help="first N questions only")
    ap.add_argument("--work-dir", type=Path, default=Path("build/hallucination_smollm2"),
                    help="resumable per-question records and hidden states (not results)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16, help="questions per greedy / p-true batch")
    ap.add_argument("--sample-prompts", type=int, default=4, help="questions sampled together (10 rows each)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--layer-step", type=int, default=1, help="probe candidate layers: every k-th block")
    ap.add_argument("--n-boot", type=int, default=1000)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    from workbench.hallucination import load_qa

    items = load_qa(QA)[: args.limit]
    work = args.work_dir
    (work / "features").mkdir(parents=True, exist_ok=True)
    gen_stages = [s for s in args.stages if s != "eval"]
    if gen_stages:
        import workbench
        from workbench.engine import Engine
        from workbench.threads import ThreadPolicy

        model, tok = workbench.load("smollm2-135m-instruct", device="cpu", dtype="float32", progress=False)
        engine = Engine(model, tok, threads=ThreadPolicy(args.threads, args.threads))
        for s in gen_stages:
            {"greedy": lambda: stage_greedy(engine, items, work, args.batch),
             "ptrue": lambda: stage_ptrue(engine, items, work, args.batch),
             "samples": lambda: stage_samples(engine, items, work, args.sample_prompts),
             "lm-judge": lambda: stage_lm_judge(engine, items, work, args.lm_judge_pairs)}[s]()
    if "eval" in args.stages:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=args.threads):  # numpy / scikit-learn BLAS threads, like torch's
            out = stage_eval(items, work, args)
        write_json(args.out / "hallucination_smollm2.json", {**provenance(), **out})
        print_table(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
