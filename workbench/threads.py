"""CPU thread policy: torch intra-op threads for prefill and for decode, set per phase and always restored.

Both default to the physical cores this process may run on (``workbench.cpu.physical_cores``). Measure with
``experiments/bench_decode.py --threads 1 2``: in experiments/results/bench_decode.json (SmolLM2-135M-Instruct,
AMD EPYC with 2 torch threads), the engine decodes batch 1 at 18.3 tok/s with 1 thread and 30.2 with 2.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from workbench.cpu import physical_cores


@dataclass(frozen=True)
class ThreadPolicy:
    prefill: int = field(default_factory=physical_cores)
    decode: int = field(default_factory=physical_cores)

    def __post_init__(self):
        if self.prefill < 1 or self.decode < 1:
            raise ValueError(f"thread counts must be >= 1, got prefill={self.prefill} decode={self.decode}")


class _PhysicalCores:
    """Default marker: ``ThreadPolicy()`` for this machine, resolved when an engine is built (not at import)."""

    def __repr__(self) -> str:
        return "DEFAULT_POLICY"


DEFAULT_POLICY = _PhysicalCores()


def resolve(policy) -> ThreadPolicy | None:
    """``DEFAULT_POLICY`` -> ``ThreadPolicy()`` (physical cores); a policy or None as given."""
    if isinstance(policy, _PhysicalCores):
        return ThreadPolicy()
    if policy is not None and not isinstance(policy, ThreadPolicy):
        raise TypeError(f"threads must be a ThreadPolicy or None, got {type(policy).__name__}")
    return policy

# torch's thread count is process-wide: the blocks open in any thread form one stack, and the newest one wins.
_lock = threading.Lock()
_active: list[tuple[object, int]] = []  # (token, count), oldest first
_saved = 0  # the count before the first open block


@contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """Set torch's intra-op thread count inside the block (None: leave it alone); always restored.

    Blocks may open and close in any order across threads: on exit torch gets the count of the newest block
    still open, or, once none is, the count from before the first.
    """
    global _saved
    if n is None:
        yield
        return
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    token = object()
    with _lock:
        if not _active:
            _saved = torch.get_num_threads()
        _active.append((token, n))
        torch.set_num_threads(n)
    try:
        yield
    finally:
        with _lock:
            _active.remove((token, n))
            torch.set_num_threads(_active[-1][1] if _active else _saved)
