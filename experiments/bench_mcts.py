"""Greedy vs best-of-N vs MCTS at an equal forward-token budget, on small arithmetic and code tasks (SmolLM2).

Rewards: exact numeric answer (arithmetic), unit-test pass rate in the sandbox (code). Best-of-N samples at
temperature 0.8 until the budget is spent and keeps the best-rewarded sample (the prompt is counted once, as
if its KV cache were shared); MCTS spends the same budget in LM forward tokens (prefix reuse makes that go
further). Reported: mean reward (pass rate) per method and task family, tokens spent, and for MCTS the forward
tokens it saved through prefix reuse. Prints a table and writes JSON.

    .venv/bin/python experiments/bench_mcts.py --budget-new-tokens 300 --max-new-tokens 32 --threads 1 \
        --json experiments/results/bench_mcts.json   # the committed results
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from provenance import provenance, write_json  # experiments/ is the script's folder

ARITH = [("What is 17 + 25?", 42), ("What is 9 times 7?", 63), ("What is 100 minus 37?", 63),
         ("What is 144 divided by 12?", 12), ("What is 8 + 15 + 7?", 30), ("What is 6 squared?", 36)]
CODE = [
    ("Write a Python function add(a, b) that returns the sum of a and b.",
     ("assert add(2, 3) == 5", "assert add(-1, 1) == 0", "assert add(10, 5) == 15")),
    ("Write a Python function is_even(n) that returns True if n is even and False otherwise.",
     ("assert is_even(4)", "assert not is_even(7)", "assert is_even(0)")),
    ("Write a Python function maximum(xs) that returns the largest number in the list xs.",
     ("assert maximum([1, 5, 3]) == 5", "assert maximum([-2, -9]) == -2", "assert maximum([7]) == 7")),
]


def tasks():
    from workbench.rewards import ExactAnswer, UnitTests

    for q, a in ARITH:
        yield "arithmetic", q + " Answer with just the number.", ExactAnswer(a)
    for q, tests in CODE:
        yield "code", q + " Reply with only the code.", UnitTests(tests)


def run(args) -> dict:
    import workbench
    from workbench.chat import prompt_ids
    from workbench.engine import Engine, GenerationConfig, SamplingParams
    from workbench.engine.mcts import MCTSConfig
    from workbench.threads import ThreadPolicy

    model, tok = workbench.load(args.model, device=args.device, progress=False)
    eng = Engine(model, tok, threads=ThreadPolicy(args.threads, args.threads))
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    rows = []
    for family, question, reward in tasks():
        ids = prompt_ids(tok, [{"role": "user", "content": question}])
        budget = len(ids) + args.budget_new_tokens
        row = {"family": family, "question": question, "budget_tokens": budget}
        t0 = time.perf_counter()
        [g] = eng.generate([ids], GenerationConfig(max_new_tokens=args.max_new_tokens))
        row["greedy"] = reward(g.text, g.token_ids)
        row["greedy_tokens"] = len(ids) + len(g.token_ids)
        t1 = time.perf_counter()
        spent, best, n = len(ids), 0.0, 0
        while spent + args.max_new_tokens <= budget or n == 0:
            [s] = eng.generate([ids], GenerationConfig(max_new_tokens=args.max_new_tokens, seed=1000 + n,
                                                       sampling=SamplingParams(temperature=0.8)))
            spent += len(s.token_ids) + 1
            best = max(best, reward(s.text, s.token_ids))
            n += 1
        row.update({"best_of_n": best, "n_samples": n, "best_of_n_tokens": spent})
        t2 = time.perf_counter()
        cfg = MCTSConfig(reward=reward, simulations=10_000, budget_tokens=budget, c_puct=args.c_puct,
                         expansion_width=args.width, chunk=args.chunk, max_new_tokens=args.max_new_tokens,
                         select="best")
        [m] = eng.generate([ids], cfg, strategy="mcts")
        t3 = time.perf_counter()
        row.update({"mcts": m.stats.reward, "mcts_simulations": m.stats.simulations,
                    "mcts_forward_tokens": m.stats.forward_tokens, "mcts_reused_tokens": m.stats.reused_tokens, "mcts_answer": decode(m.token_ids)[:200],
                    "seconds": {"greedy": t1 - t0, "best_of_n": t2 - t1, "mcts": t3 - t2}})
        rows.append(row)
        print(f"{family:>10} greedy {row['greedy']:.2f}  best-of-{n} {best:.2f}  mcts {m.stats.reward:.2f} "
              f"({m.stats.simulations} sims, {m.stats.forward_tokens} fwd, {m.stats.reused_tokens} reused)  {question[:40]!r}",
              flush=True)
    summary = {}
    for fam in ("arithmetic", "code"):
        sel = [r for r in rows if r["family"] == fam]
        summary[fam] = {k: sum(r[k] for r in sel) / len(sel) for k in ("greedy", "best_of_n", "mcts")}
    return {"model": args.model, "device": str(model.device), "torch": torch.__version__,
            "machine": platform.machine(), "budget_new_tokens": args.budget_new_tokens,
            "max_new_tokens": args.max_new_tokens, "summary": summary, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--budget-new-tokens", type=int, default=400, help="forward tokens beyond the prompt")
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=4)
    ap.add_argument("--c-puct", type=float, default=1.0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    out = run(args)
    print(f"\n{'family':>10} {'greedy':>7} {'best-of-N':>10} {'MCTS':>6}")
    for fam, s in out["summary"].items():
        print(f"{fam:>10} {s['greedy']:>7.2f} {s['best_of_n']:>10.2f} {s['mcts']:>6.2f}")
    write_json(args.json, {**provenance(), **out})


if __name__ == "__main__":
    main()
