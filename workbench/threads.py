"""CPU thread policy: decoding small models is fastest on 1 thread, prefill on 2 (measured on a 2-core box)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ThreadPolicy:
    prefill: int = 2
    decode: int = 1

    def __post_init__(self):
        if self.prefill < 1 or self.decode < 1:
            raise ValueError(f"thread counts must be >= 1, got prefill={self.prefill} decode={self.decode}")


DEFAULT_POLICY = ThreadPolicy()


@contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """Set torch's intra-op thread count inside the block (None: leave it alone); always restored."""
    if n is None:
        yield
        return
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
