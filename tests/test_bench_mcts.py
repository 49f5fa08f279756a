"""The MCTS budget-curve benchmark's bookkeeping: task sets as built, budget accounting per method, the
JSON shape of the curves, and the committed results file."""

import json
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "experiments"))
try:
    import bench_mcts as B
    from build_mcts_tasks import arithmetic, code
finally:
    sys.path.pop(0)


def test_task_files_match_builder_and_rewards_check_them():
    ar, co = B.load_tasks("arithmetic"), B.load_tasks("code")
    assert ar == arithmetic(21) and co == code()
    assert len(ar) >= 40 and len(co) >= 20 and len({t["id"] for t in ar + co}) == len(ar) + len(co)
    assert {t["question"] for t in ar}.__len__() == len(ar)
    for t in ar:
        assert B.reward_for(t)(f" {t['answer']}", []) == 1.0 and B.reward_for(t)(f" {t['answer'] + 1}", []) == 0.0


@pytest.mark.parametrize("name", ["add", "factorial", "second_largest"])
def test_code_tasks_tests_pass_a_reference_and_fail_a_wrong_body(name):
    bodies = {"add": ("\n    return a + b\n", "\n    return a - b\n"),
              "factorial": ("\n    r = 1\n    for i in range(2, n + 1):\n        r *= i\n    return r\n",
                            "\n    return n\n"),
              "second_largest": ("\n    return sorted(set(xs))[-2]\n", "\n    return sorted(xs)[-2]\n")}
    task = next(t for t in B.load_tasks("code") if t["id"] == f"code-{name}")
    good, bad = bodies[name]
    assert B.reward_for(task)(good + "```", []) == 1.0
    assert B.reward_for(task)(bad, []) < 1.0


def cells(samples, unit=4, greedy=0.0, trace=(), beam=None):
    budgets = (1, 2, 4, 8)
    return {"greedy": {"unit": unit, "reward": greedy},
            "samples": {"samples": [{"cost": c, "reward": r, "key": k} for c, r, k in samples]},
            "beam": {"by_budget": {str(k): {"reward": (beam or {}).get(k, 0.0)} for k in budgets}},
            "mcts": {"trace": [list(e) for e in trace], "forward_tokens": 32}}


def test_best_of_n_counts_only_samples_finished_within_the_budget():
    c = cells([(4, 0.0, "1"), (4, 0.0, "1"), (3, 1.0, "7"), (9, 0.0, "2")])
    assert [B.success(c, "best-of-n", k) for k in (1, 2, 4)] == [False, False, True]  # 8 < 4+4+3 = 11 <= 16


def test_self_consistency_votes_without_the_reward_and_ties_go_to_the_earliest():
    c = cells([(4, 0.0, "1"), (4, 1.0, "7"), (4, 1.0, "7"), (4, 0.0, "1"), (4, 0.0, "1")])
    assert B.success(c, "self-consistency", 1) is False  # one sample: "1"
    assert B.success(c, "self-consistency", 2) is False  # "1" and "7" tie: the earliest, "1"
    assert B.success(c, "self-consistency", 4) is False  # 4 samples: 2 vs 2, "1" first
    c = cells([(4, 1.0, "7"), (4, 0.0, "1"), (4, 1.0, "7")])
    assert B.success(c, "self-consistency", 2) is True  # tie, "7" first
    assert B.success(cells([]), "self-consistency", 8) is False


def test_mcts_success_reads_the_trace_up_to_the_budget():
    c = cells([], unit=4, trace=[(5, 0.0), (9, 0.5), (16, 1.0), (30, 0.0)])
    assert [B.success(c, "mcts", k) for k in (1, 2, 4, 8)] == [False, False, True, True]


def test_answer_keys():
    ar = B.load_tasks("arithmetic")[0]
    assert B.answer_key(ar, " 50.") == B.answer_key(ar, " 1 + 49 = 50") == "50"
    co = next(t for t in B.load_tasks("code") if t["id"] == "code-add")
    assert B.answer_key(co, "\n    return a+b\n```") == B.answer_key(co, "\n    return (a + b)  # sum\n")
    assert B.answer_key(co, "\n    return a - b\n") != B.answer_key(co, "\n    return a + b\n")


def test_curves_shape_and_paired_difference():
    per_task = {"arithmetic": {"a": cells([(4, 1.0, "1")], trace=[(4, 1.0)]),
                               "b": cells([(4, 0.0, "1")], greedy=1.0, beam={8: 1.0})}}
    cur, paired = B.curves(per_task, (1, 2, 4, 8), n_boot=200)
    assert set(cur["arithmetic"]) == set(B.METHODS)
    for pts in cur["arithmetic"].values():
        assert [p["budget"] for p in pts] == [1, 2, 4, 8]
        assert all(0 <= p["ci"][0] <= p["success"] <= p["ci"][1] <= 1 for p in pts)
    assert [p["success"] for p in cur["arithmetic"]["greedy"]] == [0.5] * 4
    assert [p["success"] for p in cur["arithmetic"]["beam"]] == [0, 0, 0, 0.5]
    assert [p["mcts_minus_best_of_n"] for p in paired["arithmetic"]] == [0.0] * 4


def test_committed_results_have_the_promised_shape():
    path = REPO / "experiments/results/bench_mcts.json"
    out = json.loads(path.read_text())
    assert set(out["curves"]) == {"arithmetic", "code"}
    for task_set, by_method in out["curves"].items():
        assert list(by_method) == list(B.METHODS)
        for pts in by_method.values():
            assert [p["budget"] for p in pts] == list(out["settings"]["budgets"])
            assert all(set(p) == {"budget", "success", "ci"} for p in pts)
        assert out["tasks"][task_set] == len(B.load_tasks(task_set))
    # the curves are what the per-task cells give (the same bootstrap seed and count)
    cur, paired = B.curves(out["per_task"], tuple(out["settings"]["budgets"]), n_boot=out["bootstrap"])
    assert cur == out["curves"] and paired == out["paired"]


def test_best_of_n_after_greedy_spends_the_rest_of_the_budget_on_samples():
    c = cells([(4, 1.0, "7")], unit=4)
    assert [B.success(c, "best-of-n-after-greedy", k) for k in (1, 2)] == [False, True]
    assert B.success(cells([], unit=4, greedy=1.0), "best-of-n-after-greedy", 1)
