"""The factual-to-imaginative dial on SmolLM2, measured by the detectors: at each level, answers to closed-book
questions, their exact-match accuracy, and the unsteered model's token-logprob and token-entropy scores of the
answers (teacher forced). Prints a table, writes JSON + PNG.

    .venv/bin/python experiments/hallucination_dial.py --json experiments/results/hallucination_dial.json

Check: both detector scores rise monotonically with the level (and accuracy falls). Bootstrap 95% intervals
over questions.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from provenance import ROOT, provenance, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("--qa", type=Path, default=ROOT / "experiments" / "data" / "closed_book_qa.jsonl")
    ap.add_argument("--questions", type=int, default=100, help="evenly spaced through the QA file (every category)")
    ap.add_argument("--levels", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import numpy as np

    import workbench
    from workbench.engine import Engine
    from workbench.hallucination import answer_prompt, load_qa
    from workbench.hallucination.dial import Dial, factual_scores
    from workbench.threads import ThreadPolicy

    model, tok = workbench.load(args.model, progress=False)
    engine = Engine(model, tok, threads=ThreadPolicy(args.threads, args.threads))
    every = load_qa(args.qa)
    items = every[:: max(1, len(every) // args.questions)][: args.questions]  # spread over the set's categories
    prompts = [answer_prompt(tok, it.question) for it in items]
    dial = Dial(engine)
    rng = np.random.default_rng(args.seed)
    boot = rng.integers(0, len(items), size=(args.n_boot, len(items)))

    def ci(values):
        v = np.asarray(values, dtype=float)
        means = v[boot].mean(1)
        return [round(float(np.quantile(means, 0.025)), 4), round(float(np.quantile(means, 0.975)), 4)]

    rows = []
    for level in args.levels:
        res = dial.generate(prompts, level, max_new_tokens=args.max_new_tokens, seed=args.seed, stop_strings=("\n",))
        answers = [r.text.strip() for r in res]
        scores = factual_scores(engine, prompts, [r.token_ids for r in res])
        correct = [it.correct(a) for it, a in zip(items, answers, strict=True)]
        lp = [s["token-logprob"] for s in scores]
        ent = [s["token-entropy"] for s in scores]
        sampling, strength = dial.settings(level)
        rows.append({"level": level, "temperature": sampling.temperature, "strength": strength,
                     "accuracy": round(float(np.mean(correct)), 4), "accuracy_ci": ci(correct),
                     "token-logprob": round(float(np.nanmean(lp)), 4), "token-logprob_ci": ci(np.nan_to_num(lp)),
                     "token-entropy": round(float(np.nanmean(ent)), 4), "token-entropy_ci": ci(np.nan_to_num(ent)),
                     "samples": [{"question": it.question, "answer": a}
                                 for it, a in list(zip(items, answers, strict=True))[:4]]})
        r = rows[-1]
        print(f"level {level:.2f}: T={r['temperature']:.2f} strength={strength:.2f} accuracy {r['accuracy']:.3f} "
              f"token-logprob {r['token-logprob']:.3f} token-entropy {r['token-entropy']:.3f}", flush=True)

    def monotone(key, up=True):
        v = [r[key] for r in rows]
        return all((b > a) if up else (b < a) for a, b in zip(v, v[1:], strict=False))

    checks = {"token-logprob rises": monotone("token-logprob"), "token-entropy rises": monotone("token-entropy"),
              "accuracy falls": monotone("accuracy", up=False)}
    print(f"\n{'level':>6} {'T':>5} {'strength':>8} {'accuracy':>9} {'token-logprob':>14} {'token-entropy':>14}")
    for r in rows:
        print(f"{r['level']:6.2f} {r['temperature']:5.2f} {r['strength']:8.2f} {r['accuracy']:9.3f} "
              f"{r['token-logprob']:14.3f} {r['token-entropy']:14.3f}")
    print("monotone:", checks)
    if args.json:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
        lv = [r["level"] for r in rows]
        for ax, key in zip(axes, ("accuracy", "token-logprob", "token-entropy"), strict=True):
            lo = [r[key] - r[f"{key}_ci"][0] for r in rows]
            hi = [r[f"{key}_ci"][1] - r[key] for r in rows]
            ax.errorbar(lv, [r[key] for r in rows], yerr=[lo, hi], marker="o", capsize=3)
            ax.set_xlabel("dial level (0 factual, 1 imaginative)")
            ax.set_title(key)
        fig.suptitle(f"{args.model}: {len(items)} closed-book questions")
        fig.tight_layout()
        png = args.json.with_suffix(".png")
        fig.savefig(png, dpi=120)
        write_json(args.json, {**provenance(), "model": args.model, "qa": str(args.qa.relative_to(ROOT)),
                               "questions": len(items), "max_new_tokens": args.max_new_tokens, "seed": args.seed,
                               "dial": {"max_temperature": dial.config.max_temperature,
                                        "max_strength": dial.config.max_strength},
                               "levels": rows, "monotone": checks, "png": png.name})


if __name__ == "__main__":
    main()
