"""Provenance for results files: the command, commit, machine, library versions and date of a run."""

from __future__ import annotations

import contextlib
import datetime
import json
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIBRARIES = ("torch", "transformers", "numpy", "triton")


def git_commit(repo: Path = ROOT) -> str:
    """HEAD's hash, with ``-dirty`` when tracked files differ from it (``unknown`` outside a checkout).

    Files under ``experiments/results/`` do not count: scripts that write their results as they go rewrite
    a tracked results file during the run, which changes nothing that is measured."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)experiments/results"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def machine() -> str:
    from workbench.cpu import cpu_name, physical_cores, vector_isa

    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} (host: {cpu_name()})"
    except ImportError:
        pass
    isa = vector_isa()
    return f"{platform.machine()} {cpu_name()}{f' ({isa})' if isa else ''}, {physical_cores()} physical cores"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for lib in LIBRARIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[lib] = metadata.version(lib)
    return out


def provenance(argv: list[str] | None = None) -> dict:
    """The fields every results JSON carries."""
    argv = sys.argv if argv is None else argv
    # quoted as a shell would need it, so that an argument holding spaces or JSON can be pasted back
    cmd = " ".join([".venv/bin/python", str(Path(argv[0]).resolve().relative_to(ROOT)) if argv else "",
                    *map(shlex.quote, argv[1:])])
    return {"command": cmd, "commit": git_commit(), "machine": machine(), "versions": versions(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def write_json(path: Path | None, data: dict) -> None:
    """Write a results file (nothing when ``path`` is None)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n")
