"""Every results file carries its provenance: command, commit, machine, library versions, date."""

import datetime
import json
import re
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parent.parent / "experiments" / "results"
FILES = sorted(RESULTS.rglob("*.json"))


def test_there_are_results():
    assert len(FILES) >= 10


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(RESULTS)) for p in FILES])
def test_results_file_has_provenance(path):
    data = json.loads(path.read_text())
    missing = [k for k in ("command", "commit", "machine", "versions", "date") if k not in data]
    assert not missing, f"{path.name} lacks {missing}"
    assert "experiments/" in data["command"] or "daert" in data["command"]
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", data["commit"]), data["commit"]
    assert isinstance(data["machine"], str) and data["machine"]
    assert isinstance(data["versions"], dict)
    datetime.datetime.fromisoformat(data["date"])


def test_command_quotes_arguments_for_the_shell():
    """An argument holding spaces or JSON comes back whole when the recorded command is split as a shell would."""
    import shlex
    import sys

    sys.path.insert(0, str(RESULTS.parent))
    try:
        from provenance import provenance
    finally:
        sys.path.remove(str(RESULTS.parent))
    argv = [str(RESULTS.parent / "edit_smollm2.py"), "--hparams", 'alphaedit={"prev_weight": 10.0}', "--limit", "2"]
    cmd = provenance(argv)["command"]
    assert shlex.split(cmd) == [".venv/bin/python", "experiments/edit_smollm2.py", *argv[1:]]
