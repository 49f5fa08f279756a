"""Add provenance fields to results files written before their scripts recorded them.

For each JSON under ``experiments/results/`` without ``command``/``commit``/``machine``/``versions``/``date``:
``commit`` and ``date`` are those of the commit that last wrote the file, ``command`` the one its script's
docstring gives for it, ``machine`` and ``versions`` what the file itself recorded (its ``machine``, ``device``,
``cpu`` and ``torch`` fields; "not recorded" otherwise), and ``provenance`` says the fields were filled in
afterwards. Fields known to have been changed after the run (``DROP``) are removed. Idempotent.

    .venv/bin/python experiments/backfill_provenance.py
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from provenance import ROOT

FIELDS = ("command", "commit", "machine", "versions", "date")
# results file -> the command that produced it (from its script's docstring)
COMMANDS = {
    "bench_decode.json": ".venv/bin/python experiments/bench_decode.py --repeats 2 --new-tokens 48 "
                         "--json experiments/results/bench_decode.json",
    "bench_kernels_h100.json": "python experiments/bench_kernels.py --json experiments/results/bench_kernels_h100.json",
    "bench_mcts.json": ".venv/bin/python experiments/bench_mcts.py --budget-new-tokens 300 --max-new-tokens 32 "
                       "--threads 1 --json experiments/results/bench_mcts.json",
    "bench_skinny.json": ".venv/bin/python experiments/bench_skinny.py --json experiments/results/bench_skinny.json",
    "bench_speculative.json": ".venv/bin/python experiments/bench_speculative.py --new-tokens 64 --repeats 2 "
                              "--json experiments/results/bench_speculative.json",
    "bench_speculative_h100.json": "python experiments/bench_speculative.py --device cuda --new-tokens 64 "
                                   "--repeats 2 --json experiments/results/bench_speculative_h100.json",
    "context_extension.json": ".venv/bin/python experiments/context_extension.py --out "
                              "experiments/results/context_extension.json (several resumed runs: see the "
                              "script's docstring)",
    "context_extension_cuda_check.json": "python experiments/context_extension.py --device cuda (1x/2x perplexity "
                                         "recomputed on the GPU; see the script's docstring)",
    "patching_smollm2.json": ".venv/bin/python experiments/patching_smollm2.py",
    "ppl_smollm2_gpl3.json": ".venv/bin/daert ppl -m smollm2-135m-instruct --corpus gpl-3 "
                             "--json-out experiments/results/ppl_smollm2_gpl3.json",
    "sae_smollm2.json": "python experiments/train_sae.py --device cuda --tokens 6000000 --lr 1.5e-3 "
                        "--aux-window 100000",
    "sae_ablation_h100.json": "python experiments/train_sae.py --device cuda ... (three runs collected; "
                              "each row has its command)",
}
DROP = {"sae_smollm2.json": ["saved_to"]}  # rewritten after the run (the script records the local folder)


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout.strip()


def backfill(path: Path) -> bool:
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or all(k in data for k in FIELDS):
        return False
    rel = str(path.relative_to(ROOT))
    commit, date = _git("log", "-1", "--format=%H %cI", "--", rel).split()
    recorded = data.get("machine") or data.get("device_name") or data.get("device") or data.get("cpu")
    versions = {"torch": data["torch"]} if "torch" in data else {}
    for key in DROP.get(path.name, []):
        data.pop(key, None)
    data.update({"command": data.get("command") or COMMANDS[path.name], "commit": commit,
                 "machine": recorded or "not recorded", "versions": versions, "date": date,
                 "provenance": "filled in from the commit that wrote this file and the fields it recorded"})
    path.write_text(json.dumps(data, indent=1) + "\n")
    return True


def main() -> None:
    for path in sorted((ROOT / "experiments" / "results").rglob("*.json")):
        print(f"{'filled' if backfill(path) else 'ok':>6}  {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
