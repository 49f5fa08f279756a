"""daert workbench: the model-internals core of the daert stack.

Importing this package has no side effects; heavy modules load on first use.

>>> import workbench
>>> model, tokenizer = workbench.load("smollm2-135m-instruct")  # doctest: +SKIP
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["load", "list_models", "__version__"]


def __getattr__(name: str):
    if name in ("load", "list_models"):
        from workbench.models import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
