"""Hand a bare top-level name back to the project that owns it.

The repository keeps ``kernels/`` and ``surgery/`` at its root, mapped to ``workbench.kernels`` and
``workbench.surgery`` by setuptools. When Python runs with the repository root on ``sys.path`` (a
REPL, ``python -c`` or a notebook kernel started there), ``import kernels`` would find that folder
before the PyPI package of the same name, which transformers imports for its kernel hub. The folders'
``__init__`` call :func:`stand_aside` when imported under the bare name: the owner's package, found on
the rest of ``sys.path``, is loaded in the folder's place; without one the folder stays an empty shell.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path


def _resolved(entry: str) -> Path | None:
    try:
        return Path(entry or ".").resolve()
    except (OSError, RuntimeError):
        return None


def stand_aside(namespace: dict) -> bool:
    """Make the shadowing package whose globals are ``namespace`` an empty shell (no ``__file__``, no
    submodules), then :func:`hand_over` its name; return whether another project took it."""
    folder = os.path.dirname(namespace["__file__"])
    namespace["__file__"] = None
    namespace["__path__"] = []  # no submodule of the folder can be imported under the bare name
    return hand_over(namespace["__name__"], folder)


def hand_over(name: str, folder: str) -> bool:
    """Load the other project's ``name`` into ``sys.modules[name]``; return whether one was found.

    ``folder`` is the shadowing folder. The import system returns whatever ``sys.modules[name]`` holds once
    the shadowing ``__init__`` has run, so the caller gets the owner's package; if the owner's import fails,
    the error propagates and the import system drops ``sys.modules[name]`` as for any failed import.
    """
    root = Path(folder).resolve().parent
    rest = [p for p in sys.path if isinstance(p, str) and _resolved(p) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, rest)
    if spec is None or spec.loader is None:
        return False
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return True
