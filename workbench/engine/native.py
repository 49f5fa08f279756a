"""C++ helpers compiled on first use with torch's extension builder (g++ and ninja), cached by torch under
``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``). ``DAERT_NO_NATIVE=1`` turns them off;
if compilation fails the callers fall back to their Python path (one warning says why)."""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import warnings
from pathlib import Path

logger = logging.getLogger(__name__)
_SRC = Path(__file__).parent / "csrc"
_loaded: dict[str, object] = {}
_failed: dict[str, str] = {}


def _cpu_tag() -> str:
    """Short hash of this CPU's instruction-set flags. The helpers are built with ``-march=native`` and torch's
    cache key does not include the CPU, so the tag keeps a home directory shared by different machines from
    loading a binary built for another instruction set."""
    from workbench.cpu import cpu_flags

    flags = cpu_flags()
    ident = platform.machine() + (" ".join(sorted(flags)) if flags else platform.processor())
    return hashlib.sha1(ident.encode()).hexdigest()[:8]


def disabled() -> bool:
    return os.environ.get("DAERT_NO_NATIVE", "") not in ("", "0")


def load(name: str, defines: dict[str, int] | None = None):
    """The compiled module for ``csrc/{name}.cpp``, or None (disabled or failed to build). ``defines``: preprocessor
    values the source reads (``-DNAME=value``), each set a build of its own (benchmarks of build-time constants)."""
    key = name + "".join(f"_{k.lower()}_{v}" for k, v in sorted((defines or {}).items()))
    if disabled() or key in _failed:
        return None
    if key not in _loaded:
        try:
            from torch.utils.cpp_extension import get_default_build_root
            from torch.utils.cpp_extension import load as build

            ext = f"daert_{key}_{_cpu_tag()}"
            root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
            if not any(root.glob(f"*/{ext}/{ext}*.so")) and not any(root.glob(f"{ext}/{ext}*.so")):
                logger.info("compiling the C++ helper %r for this CPU (first use only; about a minute) into %s",
                            key, root)
            flags = [f"-D{k}={v}" for k, v in sorted((defines or {}).items())]
            _loaded[key] = build(name=ext, sources=[str(_SRC / f"{name}.cpp")],
                                 extra_cflags=["-O3", "-march=native", "-fopenmp", *flags],
                                 extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as e:  # no compiler, no ninja, read-only cache ...
            _failed[key] = f"{type(e).__name__}: {e}"
            warnings.warn(f"daert: C++ helper {key!r} unavailable, using the Python path ({_failed[key][:200]})",
                          stacklevel=2)
            return None
    return _loaded[key]


def failure(name: str) -> str | None:
    """Why ``name`` could not be built (None if it was not tried or succeeded)."""
    return _failed.get(name)
