"""Command-line pieces for exports: ``daert export`` and the export flags other commands (``daert edit``)
can share.

``add_parser(subparsers)`` registers ``export``; ``run(args)`` runs it; ``add_export_args(parser)`` and
``export_from_args(model, tokenizer, args)`` let any command that ends with a model in memory write it out.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

EXPORT_EXAMPLES = """examples:
  daert export --hf out/smollm2-hf
  daert export --gguf out/smollm2-f16.gguf
  daert export -m tiny-llama --gguf out/tiny.gguf --gguf-dtype q8_0 --hf out/tiny-hf --overwrite
"""


@dataclass(frozen=True)
class ExportTargets:
    """What to write: an HF folder, a GGUF file, or both."""

    hf: Path | None = None
    gguf: Path | None = None
    gguf_dtype: str = "f16"
    hf_dtype: str | None = None
    overwrite: bool = False

    def __post_init__(self):
        from workbench.export.gguf import gguf_dtype

        gguf_dtype(self.gguf_dtype)  # unknown names fail here, before a model is loaded

    @property
    def empty(self) -> bool:
        return self.hf is None and self.gguf is None


def export(model, tokenizer, targets: ExportTargets) -> list[Path]:
    """Write every requested target; returns the written paths (HF folder first)."""
    from workbench.export.gguf import check_gguf_exportable, save_gguf
    from workbench.export.hf import save_hf

    if targets.gguf is not None:
        check_gguf_exportable(model)  # refuse before writing anything
    out = []
    if targets.hf is not None:
        out.append(save_hf(model, tokenizer, targets.hf, dtype=targets.hf_dtype, overwrite=targets.overwrite))
    if targets.gguf is not None:
        out.append(save_gguf(model, tokenizer, targets.gguf, dtype=targets.gguf_dtype,
                             overwrite=targets.overwrite))
    return out


def add_export_args(p: argparse.ArgumentParser) -> None:
    from workbench.export.gguf import GGUF_DTYPES
    from workbench.export.hf import SAVE_DTYPES

    p.add_argument("--hf", type=Path, default=None, metavar="DIR", help="write a Hugging Face folder here")
    p.add_argument("--gguf", type=Path, default=None, metavar="FILE", help="write a llama-architecture GGUF here")
    p.add_argument("--gguf-dtype", default="f16", choices=list(GGUF_DTYPES), help="GGUF weight type")
    p.add_argument("--hf-dtype", default=None, choices=list(SAVE_DTYPES),
                   help="HF weight dtype (None: the model's)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing targets (only once the new files are complete)")


def targets_from_args(args) -> ExportTargets:
    return ExportTargets(hf=args.hf, gguf=args.gguf, gguf_dtype=args.gguf_dtype, hf_dtype=args.hf_dtype,
                         overwrite=args.overwrite)


def export_from_args(model, tokenizer, args) -> list[Path]:
    """For commands that take :func:`add_export_args`: write what was asked for (nothing if no target).

    An existing target without ``--overwrite`` is a ``ValueError`` here (a usage error on the command line).
    """
    targets = targets_from_args(args)
    if targets.empty:
        return []
    try:
        return export(model, tokenizer, targets)
    except FileExistsError as e:
        raise ValueError(f"{e} (--overwrite)") from e


def add_parser(subparsers, formatter_class=argparse.ArgumentDefaultsHelpFormatter) -> argparse.ArgumentParser:
    p = subparsers.add_parser("export", help="write a model as an HF folder and/or a GGUF file",
                              epilog=EXPORT_EXAMPLES, formatter_class=formatter_class)
    p.add_argument("-m", "--model", default="smollm2-135m-instruct",
                   help="registry name (exact), local HF folder or hub id")
    add_export_args(p)
    return p


def run(args) -> int:
    import torch

    import workbench

    targets = targets_from_args(args)
    if targets.empty:
        raise ValueError("nothing to write: give --hf DIR and/or --gguf FILE")
    # float32 on the CPU: what the GGUF writer reads and what --hf-dtype casts from
    if targets.gguf is not None and targets.gguf.exists() and not targets.overwrite:
        raise ValueError(f"{targets.gguf} exists; pass --overwrite to replace it")  # before loading the model
    model, tok = workbench.load(args.model, device="cpu", dtype=torch.float32)
    for path in export_from_args(model, tok, args):
        sys.stdout.write(f"{path}\n")
    return 0
