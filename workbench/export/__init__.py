"""Deployable exports of a model as it is in memory (edits included): a Hugging Face folder
(:func:`save_hf`) and a llama-architecture GGUF (:func:`save_gguf`, dtypes :data:`GGUF_DTYPES`).

Importing this package loads nothing heavy; each name is imported on first use.
"""

from __future__ import annotations

_EXPORTS = {
    "save_hf": "workbench.export.hf",
    "save_gguf": "workbench.export.gguf",
    "GGUF_DTYPES": "workbench.export.gguf",
    "ExportRefused": "workbench.export.gguf",
    "check_gguf_exportable": "workbench.export.gguf",
    "reference_state_dict": "workbench.export.gguf",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'workbench.export' has no attribute {name!r}")
