"""Budget curves: greedy, best-of-N, self-consistency, beam search and MCTS at equal forward-token budgets, on
arithmetic (exact-answer reward) and small Python functions (unit tests in the sandbox), SmolLM2.

The budget is counted in forward tokens: tokens the model is run on beyond one prefill of the prompt (every
method gets that prefill once, as a shared prefix cache would give it). A decode that generates ``n`` tokens
runs ``n - 1`` of them (the first comes from the prompt's logits). The unit is the cost of the task's own
greedy decode, ``U`` (at least 1); budgets are ``k * U`` for ``k`` in ``--budgets``. A method's answer at
budget ``B`` uses only candidates completed within ``B``; a candidate cut by the budget does not count (a beam
hypothesis stopped by the budget's step limit scores 0).

- ``greedy``: one decode (its cost is ``U``, within every budget).
- ``best-of-n``: samples at ``--temperature`` (seeded, in order) while the budget lasts; the best by reward.
- ``self-consistency``: the same samples; the most frequent answer (the final number; the code's syntax tree),
  ties to the earliest. It does not see the reward.
- ``beam``: ``K = max(1, k // 2)`` beams for at most ``B // K + 1`` steps, so ``K`` beams of ``B // K`` fed
  tokens each stay within ``B`` (the ``K`` prompt copies count as one prefill); the top hypothesis.
- ``mcts``: ``budget_tokens`` = prompt + ``B`` (a hard cap); the best-rewarded complete sequence. One run at the
  largest budget gives every smaller one: the search is deterministic and a capped run is that run cut at its
  cap (``MCTSStats.trace``; tested in tests/test_mcts.py).

Success is reward 1 (the exact number; every test passing). Curves carry bootstrap 95% intervals over tasks,
and the paired difference MCTS - best-of-N with its own interval. Cells (task, method) are appended to a state
file as they finish, so an interrupted run resumes; progress is printed per cell.

    .venv/bin/python experiments/build_mcts_tasks.py    # the task sets (committed)
    .venv/bin/python experiments/bench_mcts.py --ablations widening-0.5 sampled-rollouts short-rollouts-4 \\
        c_puct-2 --ablation-sets arithmetic --json experiments/results/bench_mcts.json \\
        --png experiments/results/bench_mcts.png --state bench_mcts_cells.jsonl
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import random
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from provenance import provenance, write_json  # experiments/ is the script's folder

DATA = Path(__file__).resolve().parent / "data"
METHODS = ("greedy", "best-of-n", "self-consistency", "beam", "mcts")
# a stronger best-of-N: the greedy decode first, then samples with what is left
EXTRA_BASELINES = ("best-of-n-after-greedy",)
# MCTS variants (``--ablations``), each a change to the ``mcts`` settings: cells "mcts:<name>"
ABLATIONS = {"widening-0.5": {"widening": 0.5}, "sampled-rollouts": {"rollout": "sample"},
             "short-rollouts-4": {"rollout_tokens": 4}, "c_puct-2": {"c_puct": 2.0}}
NUMBER = r"-?\d+(?:\.\d+)?"


@dataclass(frozen=True)
class Settings:
    budgets: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    temperature: float = 1.0  # best-of-n / self-consistency samples
    max_new_tokens: dict | None = None  # per task set
    mcts_width: int = 8
    mcts_c_puct: float = 1.0
    mcts_rollout: str = "greedy"
    mcts_widening: float | None = None
    mcts_prior_temperature: float = 1.0
    sample_batch: int = 8
    max_samples: int = 256

    def max_new(self, task_set: str) -> int:
        return (self.max_new_tokens or {"arithmetic": 12, "code": 96})[task_set]

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True, default=str).encode()).hexdigest()[:12]


def load_tasks(task_set: str, limit: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in (DATA / f"mcts_{task_set}.jsonl").read_text().splitlines()]
    return rows[:limit] if limit else rows


def reward_for(task: dict):
    from workbench.rewards import ExactAnswer, UnitTests

    if "answer" in task:
        return ExactAnswer(task["answer"])
    return UnitTests(tuple(task["tests"]), prefix=task["signature"])


def answer_key(task: dict, text: str) -> str:
    """What self-consistency votes on: the final number, or the function's syntax tree (else its text)."""
    if "answer" in task:
        found = re.findall(NUMBER, text.replace(",", ""))
        return found[-1] if found else ""
    code = task["signature"] + text.split("```")[0]
    try:
        return ast.dump(ast.parse(code))
    except SyntaxError:
        return code.strip()


def stop_ids(tok, task: dict) -> tuple[int, ...]:
    """EOS plus every token whose text contains the task's stop string (a newline; a closing fence)."""
    ids = {i for i in range(len(tok)) if task["stop"] in tok.decode([i])}
    return tuple(sorted(ids | {tok.eos_token_id}))


def prompt_for(tok, task: dict) -> list[int]:
    from workbench.chat import prompt_ids

    return prompt_ids(tok, [{"role": "user", "content": task["question"]}]) + tok.encode(
        task["prefill"], add_special_tokens=False)


def cost(res) -> int:
    """Forward tokens of one decode beyond the prompt: generated tokens (the stop token included) minus one (the
    first comes from the prompt's logits; a decode that stops at once runs nothing, as a terminal child of the
    MCTS root costs nothing)."""
    return len(res.token_ids) + (res.finish_reason == "eos") - 1


# -- one cell: a task and a method ----------------------------------------------------------------------------


def run_greedy(eng, task, ids, stop, st: Settings, task_set: str) -> dict:
    from workbench.engine import GenerationConfig

    [g] = eng.generate([ids], GenerationConfig(max_new_tokens=st.max_new(task_set), eos_token_ids=stop))
    r = reward_for(task)(g.text, g.token_ids)
    return {"unit": max(1, cost(g)), "reward": r, "text": g.text}  # the budget unit is at least one token


def run_samples(eng, task, ids, stop, st: Settings, task_set: str, unit: int) -> dict:
    """Samples in seed order until their summed cost covers the largest budget."""
    from workbench.engine import GenerationConfig, SamplingParams

    reward, want, samples = reward_for(task), max(st.budgets) * unit, []
    sp = SamplingParams(temperature=st.temperature)
    while sum(s["cost"] for s in samples) < want and len(samples) < st.max_samples:
        seeds = range(len(samples), len(samples) + st.sample_batch)
        cfgs = [GenerationConfig(max_new_tokens=st.max_new(task_set), eos_token_ids=stop, seed=s, sampling=sp)
                for s in seeds]
        for res in eng.generate([ids] * len(cfgs), cfgs):
            samples.append({"cost": cost(res), "reward": reward(res.text, res.token_ids),
                            "key": answer_key(task, res.text)})
    return {"samples": samples, "covered": sum(s["cost"] for s in samples) >= want}


def run_beam(eng, task, ids, stop, st: Settings, task_set: str, unit: int) -> dict:
    from workbench.engine import BeamConfig

    reward, out = reward_for(task), {}
    for k in st.budgets:
        beams = max(1, k // 2)
        steps = min(st.max_new(task_set), (k * unit) // beams + 1)
        [b] = eng.generate([ids], BeamConfig(num_beams=beams, max_new_tokens=steps, eos_token_ids=stop),
                           strategy="beam")
        # a hypothesis the budget cut (not the task's own length limit) is no answer, as for the other methods
        cut = b.finish_reason == "length" and steps < st.max_new(task_set)
        out[str(k)] = {"beams": beams, "steps": steps, "finish_reason": b.finish_reason, "cut": cut,
                       "reward": 0.0 if cut else reward(b.text, b.token_ids), "text": b.text}
    return {"by_budget": out}


def run_mcts(eng, task, ids, stop, st: Settings, task_set: str, unit: int, **overrides) -> dict:
    from workbench.engine.mcts import MCTSConfig

    kw = dict(c_puct=st.mcts_c_puct, expansion_width=st.mcts_width, rollout=st.mcts_rollout,
              widening=st.mcts_widening, temperature=st.mcts_prior_temperature)
    cfg = MCTSConfig(reward=reward_for(task), simulations=100_000, budget_tokens=len(ids) + max(st.budgets) * unit,
                     max_new_tokens=st.max_new(task_set), select="best", eos_token_ids=stop, **{**kw, **overrides})
    [m] = eng.generate([ids], cfg, strategy="mcts")
    s = m.stats
    return {"trace": [[t - len(ids), r] for t, r in s.trace], "simulations": s.simulations,
            "forward_tokens": s.forward_tokens - len(ids), "reused_tokens": s.reused_tokens, "nodes": s.nodes,
            "text": m.text}


RUNNERS = {"greedy": run_greedy, "samples": run_samples, "beam": run_beam, "mcts": run_mcts}


# -- success at a budget -------------------------------------------------------------------------------------


def success(cells: dict, method: str, k: int) -> bool:
    """Whether ``method`` solves the task within ``k`` times its greedy cost, from the task's cells."""
    if method == "beam":  # run once per budget
        return cells["beam"]["by_budget"][str(k)]["reward"] == 1.0
    return solved_within(cells, method, k * cells["greedy"]["unit"])


def solved_within(cells: dict, method: str, budget: int) -> bool:
    """Whether ``method`` solves the task within ``budget`` forward tokens."""
    if method == "greedy":
        return cells["greedy"]["reward"] == 1.0
    if method == "best-of-n-after-greedy":
        rest = budget - cells["greedy"]["unit"]
        return cells["greedy"]["reward"] == 1.0 or solved_within(cells, "best-of-n", rest)
    if method in ("best-of-n", "self-consistency"):
        drawn = cells["samples"]
        if not drawn.get("covered", True) and budget > sum(s["cost"] for s in drawn["samples"]):
            raise ValueError(f"samples stop at {len(drawn['samples'])} before covering budget {budget}")
        spent, within = 0, []
        for s in cells["samples"]["samples"]:
            spent += s["cost"]
            if spent > budget:
                break
            within.append(s)
        if method == "best-of-n":
            return any(s["reward"] == 1.0 for s in within)
        if not within:
            return False
        counts = Counter(s["key"] for s in within)
        top = max(counts.values())
        key = next(s["key"] for s in within if counts[s["key"]] == top)  # ties: the earliest
        return next(s["reward"] for s in within if s["key"] == key) == 1.0
    if method == "mcts" or method.startswith("mcts:"):
        return any(r == 1.0 for t, r in cells[method]["trace"] if t <= budget)
    raise KeyError(method)


def bootstrap(values: list[float], n_boot: int, seed: int) -> list[float]:
    if not values:
        return [math.nan, math.nan]
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(values, k=len(values))) / len(values) for _ in range(n_boot))
    return [means[int(0.025 * n_boot)], means[int(0.975 * n_boot) - 1]]


def curves(per_task: dict[str, dict[str, dict]], budgets, n_boot: int = 2000, seed: int = 0,
           methods=METHODS) -> tuple[dict, dict]:
    """``{task_set: {method: [{"budget": k, "success": s, "ci": [lo, hi]}]}}`` and the paired MCTS - best-of-N."""
    out, paired = {}, {}
    for task_set, tasks in per_task.items():
        need = {"greedy", "samples", "beam", "mcts"} | {m for m in methods if m.startswith("mcts:")}
        done = [c for c in tasks.values() if need <= set(c)]
        out[task_set], paired[task_set] = {}, []
        for method in methods:
            out[task_set][method] = []
            for k in budgets:
                vals = [float(success(c, method, k)) for c in done]
                out[task_set][method].append({"budget": k, "success": sum(vals) / max(1, len(vals)),
                                              "ci": bootstrap(vals, n_boot, seed)})
        for k in budgets:
            diff = [float(success(c, "mcts", k)) - float(success(c, "best-of-n", k)) for c in done]
            paired[task_set].append({"budget": k, "mcts_minus_best_of_n": sum(diff) / max(1, len(diff)),
                                     "ci": bootstrap(diff, n_boot, seed), "tasks": len(done)})
    return out, paired


# -- driver --------------------------------------------------------------------------------------------------


def load_state(path: Path | None, key: str) -> dict:
    state: dict = {}
    if path and path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec["settings"] == key:
                state.setdefault(rec["task_set"], {}).setdefault(rec["task"], {})[rec["cell"]] = rec["result"]
    return state


def run(eng, tok, task_sets, st: Settings, state_path: Path | None = None, limit: int | None = None,
        log=print, ablations=(), ablation_sets=None) -> dict:
    key = st.key()
    state = load_state(state_path, key)
    variants = {f"mcts:{name}": lambda *a, _o=ABLATIONS[name], **k: run_mcts(*a, **k, **_o) for name in ablations}
    for task_set in task_sets:
        with_ablations = ablation_sets is None or task_set in ablation_sets
        runners = {**RUNNERS, **(variants if with_ablations else {})}
        tasks = load_tasks(task_set, limit)
        for i, task in enumerate(tasks):
            cells = state.setdefault(task_set, {}).setdefault(task["id"], {})
            ids, stop = prompt_for(tok, task), stop_ids(tok, task)
            for cell, runner in runners.items():
                if cell in cells:
                    continue
                t0 = time.perf_counter()
                extra = {} if cell == "greedy" else {"unit": cells["greedy"]["unit"]}
                cells[cell] = runner(eng, task, ids, stop, st, task_set, **extra)
                cells[cell]["seconds"] = time.perf_counter() - t0
                if state_path:
                    with state_path.open("a") as f:
                        f.write(json.dumps({"settings": key, "task_set": task_set, "task": task["id"],
                                            "cell": cell, "result": cells[cell]}) + "\n")
                log(f"[{task_set} {i + 1}/{len(tasks)} {task['id']}] {cell}: {cells[cell]['seconds']:.1f} s")
            marks = " ".join(f"{m}={''.join('x' if success(cells, m, k) else '.' for k in st.budgets)}"
                             for m in METHODS)
            log(f"[{task_set} {i + 1}/{len(tasks)} {task['id']}] U={cells['greedy']['unit']} {marks}")
    return state


def plot(curves_: dict, path: Path, extra: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves_), figsize=(6 * len(curves_), 4.2), squeeze=False)
    for ax, (task_set, by_method) in zip(axes[0], curves_.items(), strict=True):
        for method, pts in by_method.items():
            xs = [p["budget"] for p in pts]
            ax.plot(xs, [p["success"] for p in pts], marker="o", label=method)
            ax.fill_between(xs, [p["ci"][0] for p in pts], [p["ci"][1] for p in pts], alpha=0.12)
        for method, pts in (extra or {}).get(task_set, {}).items():  # extra baselines: dashed, no band
            ax.plot([p["budget"] for p in pts], [p["success"] for p in pts], ls="--", marker=".", label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("forward-token budget (x the task's greedy decode)")
        ax.set_ylabel("success rate")
        ax.set_title(task_set)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sets", nargs="+", default=["arithmetic", "code"], choices=["arithmetic", "code"])
    ap.add_argument("--limit", type=int, default=None, help="first N tasks per set (quick runs)")
    ap.add_argument("--budgets", type=int, nargs="+", default=list(Settings.budgets))
    ap.add_argument("--temperature", type=float, default=Settings.temperature)
    ap.add_argument("--width", type=int, default=Settings.mcts_width)
    ap.add_argument("--c-puct", type=float, default=Settings.mcts_c_puct)
    ap.add_argument("--rollout", default=Settings.mcts_rollout, choices=["greedy", "sample"])
    ap.add_argument("--widening", type=float, default=None)
    ap.add_argument("--prior-temperature", type=float, default=Settings.mcts_prior_temperature)
    ap.add_argument("--boot", type=int, default=2000)
    ap.add_argument("--ablations", nargs="*", default=[], choices=list(ABLATIONS),
                    help="MCTS variants to run as well (reported under 'ablations')")
    ap.add_argument("--ablation-sets", nargs="+", default=None, choices=["arithmetic", "code"],
                    help="the task sets the ablations run on (default: all of --sets)")
    ap.add_argument("--state", type=Path, default=None, help="JSONL of finished cells (resumed from)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--png", type=Path, default=None)
    args = ap.parse_args()
    if sorted(set(args.budgets)) != args.budgets or args.budgets[0] < 1:
        ap.error("--budgets must be increasing integers >= 1")

    import torch

    import workbench
    from workbench.engine import Engine
    from workbench.threads import ThreadPolicy

    st = Settings(budgets=tuple(args.budgets), temperature=args.temperature, mcts_width=args.width,
                  mcts_c_puct=args.c_puct, mcts_rollout=args.rollout, mcts_widening=args.widening,
                  mcts_prior_temperature=args.prior_temperature)
    torch.manual_seed(0)
    model, tok = workbench.load(args.model, device=args.device, progress=False)
    eng = Engine(model, tok, threads=ThreadPolicy(args.threads, args.threads))
    t0 = time.perf_counter()
    state = run(eng, tok, args.sets, st, args.state, args.limit, log=lambda s: print(s, flush=True),
                ablations=args.ablations, ablation_sets=args.ablation_sets)
    per_task = {s: {t["id"]: state[s][t["id"]] for t in load_tasks(s, args.limit)} for s in args.sets}
    cur, paired = curves(per_task, st.budgets, args.boot)
    extra = curves(per_task, st.budgets, args.boot, methods=EXTRA_BASELINES)[0]
    abl_sets = [s for s in args.sets if args.ablation_sets is None or s in args.ablation_sets]
    abl = curves({s: per_task[s] for s in abl_sets}, st.budgets, args.boot,
                 methods=["mcts"] + [f"mcts:{a}" for a in args.ablations])[0] if args.ablations else {}
    print(f"\n{'set':>10} {'method':>17} " + " ".join(f"{k:>5}x" for k in st.budgets))
    for task_set, by_method in cur.items():
        for method, pts in by_method.items():
            print(f"{task_set:>10} {method:>17} " + " ".join(f"{p['success']:>6.2f}" for p in pts))
        print(f"{task_set:>10} {'mcts - best-of-n':>17} "
              + " ".join(f"{p['mcts_minus_best_of_n']:>+6.2f}" for p in paired[task_set]))
        for method, pts in extra[task_set].items():
            print(f"{task_set:>10} {method[:17]:>17} " + " ".join(f"{p['success']:>6.2f}" for p in pts))
        for method, pts in abl.get(task_set, {}).items():
            if method != "mcts":
                print(f"{task_set:>10} {method:>17} " + " ".join(f"{p['success']:>6.2f}" for p in pts))
    units = {s: sum(c["greedy"]["unit"] for c in per_task[s].values()) / len(per_task[s]) for s in args.sets}
    out = {**provenance(), "model": args.model, "device": str(model.device), "threads": args.threads,
           "settings": asdict(st), "mean_unit_tokens": units, "bootstrap": args.boot, "curves": cur,
           "paired": paired,
           "extra_baselines": extra, "ablations": {"variants": {a: ABLATIONS[a] for a in args.ablations},
                                                   "curves": abl},
           "tasks": {s: len(per_task[s]) for s in args.sets}, "seconds": time.perf_counter() - t0,
           "per_task": per_task}
    write_json(args.json, out)
    if args.png:
        plot(cur, args.png, extra)


if __name__ == "__main__":
    main()
