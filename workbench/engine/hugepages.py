"""Weight copies on 2 MiB pages.

A decode step at batch 1 streams every weight once, and with 4 KiB pages every 4 KiB of a weight matrix costs
one TLB miss (a page-table walk). The packed backend's streamed weight copies are therefore placed in one
anonymous mapping that asks the kernel for transparent huge pages (``madvise(MADV_HUGEPAGE)``, Linux).
``experiments/bench_pages.py`` times SmolLM2's decode steps on both placements side by side.

Where the OS has no ``MADV_HUGEPAGE``, where transparent huge pages are set to ``never``, or with
``DAERT_NO_HUGEPAGES=1``, the copies live in ordinary memory; the values are the same either way.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Sequence

import torch

logger = logging.getLogger(__name__)
PAGE = 1 << 21  # one transparent huge page (x86-64, arm64 with 4 KiB base pages)
ALIGN = 64  # each tensor starts on a cache line


def disabled() -> bool:
    return os.environ.get("DAERT_NO_HUGEPAGES", "") not in ("", "0")


def available() -> bool:
    """Whether copies can ask for huge pages here (the advice may still be declined by the kernel)."""
    return not disabled() and hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_ANONYMOUS")


def _arena(nbytes: int) -> tuple[torch.Tensor, bool]:
    """A flat uint8 tensor of at least ``nbytes`` starting on a 2 MiB boundary, and whether it was advised."""
    if not available():
        return torch.empty(nbytes, dtype=torch.uint8), False
    size = -(-nbytes // PAGE) * PAGE
    try:
        mm = mmap.mmap(-1, size + PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        mm.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError) as e:  # no such advice on this kernel, or the mapping was refused
        logger.info("huge pages unavailable (%s): weight copies use ordinary pages", e)
        return torch.empty(nbytes, dtype=torch.uint8), False
    flat = torch.frombuffer(mm, dtype=torch.uint8)  # keeps the mapping alive as long as any view of it
    skip = -flat.data_ptr() % PAGE
    return flat[skip: skip + nbytes], True


def copies(tensors: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], bool]:
    """Contiguous copies of ``tensors`` (CPU) in one huge-page arena, same shapes, dtypes and values; and
    whether the arena was advised. Empty input gives ``([], False)``."""
    if not tensors:
        return [], False
    for t in tensors:
        if t.device.type != "cpu":
            raise ValueError(f"huge-page copies are for CPU tensors, got one on {t.device}")
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    flat, advised = _arena(total)
    out = []
    for t, off in zip(tensors, offsets, strict=True):
        n = t.numel() * t.element_size()
        view = flat[off: off + n].view(t.dtype).view(t.shape)
        view.copy_(t)
        out.append(view)
    return out, advised
