"""CPU thread policy: torch intra-op threads for prefill and for decode, set per phase and always restored.

Default 2 and 2: on the 2-core development box, SmolLM2-135M decodes at 38 tok/s with 2 threads vs 21 with 1
(experiments/results/bench_decode.json); measure with ``experiments/bench_decode.py --threads 1 2`` elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ThreadPolicy:
    prefill: int = 2
    decode: int = 2

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
