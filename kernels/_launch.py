"""Shared launcher checks: which implementation runs, and clear errors for bad inputs."""

from __future__ import annotations

import os

import torch

IMPLS = ("auto", "triton", "torch")


def interpreting() -> bool:
    """True when Triton's CPU interpreter is on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_impl(impl: str, *tensors: torch.Tensor) -> str:
    """``auto``: Triton on CUDA tensors (or on CPU under the interpreter), else the torch reference."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    on_cuda = all(t.is_cuda for t in tensors)
    if impl == "torch":
        return "torch"
    usable = triton_importable() and (on_cuda or (interpreting() and not any(t.is_cuda for t in tensors)))
    if impl == "triton" and not usable:
        raise RuntimeError("the Triton kernel needs CUDA tensors and triton installed, or TRITON_INTERPRET=1 "
                           "(set before the first launch) to run on CPU; use impl='torch' for the reference")
    return "triton" if usable else "torch"


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def same_device(*tensors: torch.Tensor) -> None:
    devs = {t.device for t in tensors}
    check(len(devs) == 1, f"all tensors must be on one device, got {sorted(map(str, devs))}")
