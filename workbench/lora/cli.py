"""``--adapter [NAME=]PATH`` for ``daert generate``, ``chat`` and ``serve``: PEFT LoRA folders on the base model."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_adapter_args(parser: argparse.ArgumentParser, help_text: str) -> argparse.ArgumentParser:
    parser.add_argument("--adapter", action="append", default=None, metavar="[NAME=]PATH", help=help_text)
    return parser


def parse_adapters(values: list[str] | None) -> list[tuple[str, Path]]:
    """``[(name, folder)]`` from ``--adapter`` values; the name defaults to the folder's name."""
    out: list[tuple[str, Path]] = []
    for v in values or []:
        name, sep, path = v.partition("=")
        if not sep:
            name, path = Path(v).name, v
        if not name or not path:
            raise ValueError(f"--adapter takes [NAME=]PATH, got {v!r}")
        if not Path(path).is_dir():
            raise ValueError(f"--adapter {v}: no such adapter folder {path!r}")
        if name in {n for n, _ in out}:
            raise ValueError(f"--adapter: the name {name!r} is given twice")
        out.append((name, Path(path)))
    return out


def registry_for(args, model):
    """An :class:`~workbench.lora.AdapterRegistry` holding the ``--adapter`` folders (None without any)."""
    adapters = parse_adapters(getattr(args, "adapter", None))
    if not adapters:
        return None
    from workbench.lora import AdapterRegistry

    reg = AdapterRegistry(model, max_resident=max(8, len(adapters)))
    for name, path in adapters:
        reg.add(name, path)
    return reg
