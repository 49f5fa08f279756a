"""Package layout: kernels/ and surgery/ import only as workbench.kernels / workbench.surgery."""

import subprocess
import sys

import pytest
from conftest import REPO


def test_subpackages_map_to_top_level_folders():
    import workbench.kernels
    import workbench.surgery

    assert workbench.kernels.__file__ == str(REPO / "kernels" / "__init__.py")
    assert workbench.surgery.__file__ == str(REPO / "surgery" / "__init__.py")


@pytest.mark.parametrize("bare", ["kernels", "surgery"])
@pytest.mark.parametrize("cwd", ["repo", "elsewhere"])
def test_bare_name_never_resolves_to_this_project(bare, cwd, tmp_path):
    # From the repo root the folder itself is on sys.path (worst case); elsewhere it must not be found.
    code = (
        "import sys, importlib\n"
        f"try:\n    m = importlib.import_module({bare!r})\nexcept ImportError:\n    print('ABSENT'); sys.exit(0)\n"
        "f = getattr(m, '__file__', None)\n"
        "api = [n for n in dir(m) if not n.startswith('__')]\n"
        f"try:\n    importlib.import_module({bare!r} + '.__init__'); sub = True\nexcept ImportError:\n    sub = False\n"
        "print('FOUND', f, api, list(getattr(m, '__path__', [])), sub)"
    )
    run_dir = REPO if cwd == "repo" else tmp_path
    out = subprocess.run([sys.executable, "-c", code], cwd=run_dir, capture_output=True, text=True, check=True)
    out = out.stdout.strip()
    if out != "ABSENT":  # another project's package, or our inert shell: never our code
        assert str(REPO) not in out, f"'import {bare}' reached this project: {out}"
        if cwd == "repo":
            assert out == "FOUND None [] [] False", out


def test_transformers_probe_is_not_fooled_from_repo_root():
    code = "from transformers.utils import is_kernels_available; print(is_kernels_available())"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_import_workbench_is_light():
    code = "import sys, workbench; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_console_script_installed():
    exe = REPO / ".venv" / "bin" / "daert"
    daert = exe if exe.exists() else "daert"
    out = subprocess.run([str(daert), "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("models", "generate", "chat", "ppl"):
        assert cmd in out


def test_every_subpackage_is_listed_in_pyproject():
    """A non-editable install ships only the listed packages: a forgotten one would vanish from the wheel."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"workbench." + ".".join(p.parent.relative_to(REPO / "workbench").parts)
             for p in (REPO / "workbench").rglob("__init__.py")} | {"workbench.kernels", "workbench.surgery"}
    found = {f.rstrip(".") for f in found}
    assert found == listed
