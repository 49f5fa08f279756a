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


def _probe_bare(bare, run_dir):
    code = (
        "import sys, importlib\n"
        f"try:\n    m = importlib.import_module({bare!r})\nexcept ImportError:\n    print('ABSENT'); sys.exit(0)\n"
        "f = getattr(m, '__file__', None)\n"
        "api = sorted(n for n in dir(m) if not n.startswith('__'))\n"
        f"try:\n    importlib.import_module({bare!r} + '.__init__'); sub = True\nexcept ImportError:\n    sub = False\n"
        "print('FOUND', f, api, list(getattr(m, '__path__', [])), sub)"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=run_dir, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.parametrize("bare", ["kernels", "surgery"])
def test_bare_name_never_resolves_to_this_project(bare, tmp_path):
    # From the repo root the folder itself is on sys.path (worst case): the bare name must give what it
    # gives elsewhere (the PyPI project of that name, e.g. HF's `kernels`, which transformers imports),
    # or, with no such project installed, an empty shell. Never this project's code.
    elsewhere = _probe_bare(bare, tmp_path)
    from_repo = _probe_bare(bare, REPO)
    ours = str(REPO / bare)
    assert ours not in elsewhere and ours not in from_repo, (elsewhere, from_repo)
    if elsewhere == "ABSENT":
        assert from_repo in ("ABSENT", "FOUND None [] [] False"), from_repo
    else:
        assert from_repo == elsewhere


def test_transformers_kernel_hub_probe_agrees_from_repo_root(tmp_path):
    # transformers imports the PyPI `kernels` package when its probe says it is there; from the repo root
    # the probe and that import must behave as they do anywhere else (a failure here breaks model loading).
    code = (
        "from transformers.utils import is_kernels_available\n"
        "ok = is_kernels_available()\n"
        "if ok:\n    import transformers.integrations.hub_kernels\n"
        "print(ok)"
    )
    outs = [subprocess.run([sys.executable, "-c", code], cwd=d, capture_output=True, text=True, check=True)
            .stdout.strip() for d in (REPO, tmp_path)]
    assert outs[0] == outs[1] and outs[0] in ("True", "False"), outs


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
