"""The code sandbox: pass rates, and the limits really hold (time, memory, files, network, output)."""

import os
from dataclasses import replace
from pathlib import Path

import pytest

from workbench.sandbox import SandboxLimits, run_tests

GOOD = "def square(x):\n    return x * x\n"
TESTS = ["assert square(2) == 4", "assert square(-3) == 9", "assert square(0) == 1"]  # the last one is wrong
# Tests that are not about the time limits run with room to spare: on a loaded CI machine a sandbox's start can
# take seconds, and a default 5 s wall limit would turn that into a failure. These only catch hangs.
ROOMY = SandboxLimits(cpu_seconds=10, wall_seconds=120)


def test_pass_rate():
    res = run_tests(GOOD, TESTS, ROOMY)
    assert res.results == [True, True, False] and res.pass_rate == pytest.approx(2 / 3) and res.error is None


def test_syntax_error_fails_everything():
    res = run_tests("def square(x) return x", TESTS, ROOMY)
    assert res.passed == 0 and "SyntaxError" in res.error


def test_wall_timeout_kills_the_process():
    # the sandbox's own wall-clock kill: a 2 s limit on a 120 s sleep. Killed, the run ends at ~2 s plus the
    # start; unkilled, at >= 120 s. The 60 s bound sits far from both, so a loaded machine cannot flip it.
    res = run_tests("import time\ntime.sleep(120)", ["assert True"], SandboxLimits(wall_seconds=2.0))
    assert res.timed_out and res.passed == 0 and res.seconds < 60


def test_cpu_limit():
    # 1 CPU-second takes longer than 1 s of wall time on a busy machine: the wall limit is far out of the way
    res = run_tests("while True:\n    pass", ["assert True"], SandboxLimits(cpu_seconds=1, wall_seconds=120))
    assert res.passed == 0 and not res.timed_out and "CPU time" in res.error


def test_memory_limit():
    code = "big = bytearray(800 * 1024 * 1024)\ndef f():\n    return 1\n"
    res = run_tests(code, ["assert f() == 1"], replace(ROOMY, memory_mb=256))
    assert res.passed == 0 and "MemoryError" in (res.error or "")


def test_writes_outside_are_blocked_inside_allowed(tmp_path):
    target = tmp_path / "pwned.txt"
    code = (f"open({str(target)!r}, 'w').write('x')\n")
    res = run_tests(code, ["assert True"], ROOMY)
    assert not target.exists() and "PermissionError" in res.error
    res = run_tests("open('scratch.txt', 'w').write('ok')\nX = open('scratch.txt').read()\n", ["assert X == 'ok'"], ROOMY)
    assert res.passed == 1
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    res = run_tests(f"import os\nos.remove({str(victim)!r})\n", ["assert True"], ROOMY)
    assert victim.exists() and "PermissionError" in res.error


def test_no_network_and_no_processes():
    res = run_tests("import socket\ns = socket.create_connection(('127.0.0.1', 9))\n", ["assert True"], ROOMY)
    assert res.passed == 0 and "PermissionError" in res.error
    res = run_tests("import subprocess\nsubprocess.run(['true'])\n", ["assert True"], ROOMY)
    assert res.passed == 0 and "PermissionError" in res.error
    res = run_tests("import os\nos.system('true')\n", ["assert True"], ROOMY)
    assert res.passed == 0 and "PermissionError" in res.error


def test_output_is_capped():
    res = run_tests("print('x' * 10_000_000)\nOK = 1\n", ["assert OK == 1"], replace(ROOMY, output_bytes=4096))
    assert len(res.stdout) <= 4096 and res.passed == 0


def test_environment_is_clean(monkeypatch):
    monkeypatch.setenv("DAERT_SECRET", "s3cret")
    res = run_tests("import os\nV = os.environ.get('DAERT_SECRET')\n", ["assert V is None"], ROOMY)
    assert res.passed == 1
    assert Path(os.getcwd()).exists()


def test_bad_arguments():
    with pytest.raises(TypeError):
        run_tests(GOOD, "assert True")
    with pytest.raises(ValueError):
        SandboxLimits(memory_mb=1)
