"""Run generated Python against unit tests in a constrained subprocess; the pass rate is a reward.

Limits (per run): CPU seconds and address space (``setrlimit``), wall-clock timeout (the whole process group is
killed), output size (stdout/stderr go to files capped with ``RLIMIT_FSIZE``), a fresh temporary directory as
the working directory, an isolated interpreter (``-I``: no user site, no PYTHON* variables). Inside, a PEP 578
audit hook (it cannot be removed once installed) refuses network sockets, new processes, and writing, deleting
or renaming files outside the sandbox directory.

This contains mistakes of a model, not a determined attacker with native-code tricks: run untrusted code at
scale inside a container or VM as well.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

_RUNNER = r'''
import json, os, sys
SANDBOX = os.path.realpath(os.getcwd())
NONCE = sys.argv[1]

def _inside(path):
    try:
        p = os.path.realpath(os.fsdecode(path) if not isinstance(path, int) else "/proc/self/fd/%d" % path)
    except Exception:
        return False
    return p == SANDBOX or p.startswith(SANDBOX + os.sep)

_BLOCKED_PREFIXES = ("socket.", "subprocess.", "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn",
                     "os.system", "os.kill", "os.killpg", "pty.", "ctypes.dlopen", "ctypes.dlsym", "mmap.__new__")
_PATH_EVENTS = {"os.remove", "os.rmdir", "os.mkdir", "os.rename", "os.truncate", "os.chmod", "os.chown",
                "os.link", "os.symlink", "shutil.rmtree", "os.utime"}

def _hook(event, args):
    if event.startswith(_BLOCKED_PREFIXES):
        raise PermissionError("sandbox: %s is not allowed" % event)
    if event == "open":
        path, mode = args[0], args[1] or "r"
        writing = isinstance(mode, str) and any(c in mode for c in "wax+")
        if isinstance(mode, int):
            writing = bool(mode & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND))
        if writing and not _inside(path):
            raise PermissionError("sandbox: writing outside the sandbox directory is not allowed")
    elif event in _PATH_EVENTS:
        paths = [a for a in args if isinstance(a, (str, bytes, os.PathLike))]
        if not all(_inside(p) for p in paths):
            raise PermissionError("sandbox: %s outside the sandbox directory is not allowed" % event)

code = open("solution.py").read()
tests = json.load(open("tests.json"))
sys.addaudithook(_hook)
env = {"__name__": "__solution__"}
results, error = [], None
try:
    exec(compile(code, "solution.py", "exec"), env)
except BaseException as e:  # noqa
    error = "%s: %s" % (type(e).__name__, e)
for t in tests:
    if error is not None:
        results.append(False)
        continue
    try:
        exec(compile(t, "test", "exec"), dict(env))
        results.append(True)
    except BaseException as e:  # noqa
        results.append(False)
with open("result.json", "w") as f:
    f.write(json.dumps({"nonce": NONCE, "results": results, "error": error}))
'''


@dataclass(frozen=True)
class SandboxLimits:
    cpu_seconds: float = 2.0
    wall_seconds: float = 5.0
    memory_mb: int = 512
    output_bytes: int = 64 * 1024

    def __post_init__(self):
        if self.cpu_seconds <= 0 or self.wall_seconds <= 0 or self.memory_mb < 32 or self.output_bytes < 1:
            raise ValueError(f"bad sandbox limits {self}")


@dataclass
class SandboxResult:
    passed: int
    total: int
    results: list[bool] = field(default_factory=list)
    error: str | None = None  # exception while defining the solution, or why the run failed
    timed_out: bool = False
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0

    @property
    def pass_rate(self) -> float:
        return self.passed / self.total if self.total else 0.0


def _limits(lim: SandboxLimits):
    import resource

    def apply():
        os.setsid()
        cpu = max(1, int(lim.cpu_seconds + 0.999))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        mem = lim.memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_FSIZE, (lim.output_bytes, lim.output_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over-long writes fail with an error instead

    return apply


def run_tests(code: str, tests: list[str], limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Execute ``code``, then each test (Python statements, e.g. ``assert f(2) == 4``) in a fresh sandbox."""
    if not isinstance(code, str) or not isinstance(tests, list) or not all(isinstance(t, str) for t in tests):
        raise TypeError("code must be a string and tests a list of strings")
    nonce = secrets.token_hex(8)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="daert-sandbox-") as tmp:
        d = Path(tmp)
        (d / "solution.py").write_text(code)
        (d / "tests.json").write_text(json.dumps(tests))
        (d / "runner.py").write_text(_RUNNER)
        with open(d / "stdout.txt", "wb") as out, open(d / "stderr.txt", "wb") as err:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "runner.py", nonce], cwd=d, stdout=out,
                                    stderr=err, stdin=subprocess.DEVNULL, preexec_fn=_limits(limits),
                                    env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
            timed_out = False
            try:
                proc.wait(timeout=limits.wall_seconds)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        read = lambda name: (d / name).read_bytes()[: limits.output_bytes].decode(errors="replace")  # noqa: E731
        res = SandboxResult(0, len(tests), [False] * len(tests), None, timed_out, proc.returncode,
                            read("stdout.txt"), read("stderr.txt"), time.perf_counter() - t0)
        try:
            payload = json.loads((d / "result.json").read_text())
            ok = payload.get("nonce") == nonce and len(payload.get("results", [])) == len(tests)
        except (OSError, ValueError):
            payload, ok = {}, False
    if ok:
        res.results = [bool(r) for r in payload["results"]]
        res.passed = sum(res.results)
        res.error = payload.get("error")
    else:
        why = "wall-clock timeout" if timed_out else (
            "CPU time limit" if proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL) else
            f"exit status {proc.returncode}")
        res.error = f"no result: {why}"
    return res
