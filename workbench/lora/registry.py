"""Many LoRA adapters on one base model: a registry with a bounded set of resident adapters in stacked pools.

Resident adapters live in slots of per-module pools, as multi-tenant LoRA servers keep them (Punica, Chen et al.
2023; S-LoRA, Sheng et al. 2023): for every adapted module path, ``a`` [slots, r_max, in] holds each slot's A
and ``bt`` [slots, r_max, out] its B transposed with the scaling folded in (``scaling * B``)ᵀ, zero-padded past
the adapter's rank (``ranks`` [slots]). A batch then names one slot per row, and the backends gather from the
pools: the base weights are never touched and adapters are never merged.

Residency is an LRU bounded by count (``max_resident``) and/or by the pools' bytes (``max_bytes``). Adapters are
read and checked when registered, copied into the pools on first use, and read from their folder again after an
eviction. A running batch holds a :class:`Lease` on its
slots, so they cannot be evicted under it; when every slot is leased, loading another adapter is refused.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from workbench.errors import UnknownNameError
from workbench.lora.adapter import AdapterError, LoraAdapter, load_adapter


class AdapterBusyError(AdapterError):
    """Every resident slot is held by running batches: retry when one finishes (the server answers 429)."""

log = logging.getLogger(__name__)


@dataclass
class Pool:
    """One module path's stacked adapters (see the module docstring)."""
    a: torch.Tensor  # [slots, r_max, in]
    bt: torch.Tensor  # [slots, r_max, out]
    ranks: torch.Tensor  # [slots] int32: 0 where the slot's adapter does not adapt this module


@dataclass
class _Entry:
    source: str | None  # folder, re-read after eviction; None: kept in memory (given as a LoraAdapter)
    adapter: LoraAdapter | None  # loaded tensors (None while evicted)
    fingerprint: str


class Lease:
    """Slots pinned for a running batch (released by :meth:`release` or when the lease is garbage collected)."""

    def __init__(self, registry: AdapterRegistry, slots: dict[str, int]):
        self.registry = registry
        self.slots = slots  # adapter name -> slot
        self._finalizer = weakref.finalize(self, registry._unpin, tuple(slots.values()))

    def release(self) -> None:
        self._finalizer()


class AdapterRegistry:
    """Named LoRA adapters for one base model (see the module docstring)::

        reg = AdapterRegistry(model, max_resident=8)
        reg.add("sql", "adapters/sql")              # a PEFT folder, checked against the model now
        engine = Engine(model, tok, adapters=reg)
        with engine.intervene(adapters=["sql", None]):
            engine.generate(["SELECT", "Hello"], cfg)
    """

    KERNELS = ("auto", "triton", "torch")

    def __init__(self, model: nn.Module, *, max_resident: int = 8, max_bytes: int | None = None,
                 kernel: str = "auto"):
        """``kernel``: how the model's own forward adds the terms on CUDA (``auto``/``triton``: the BGMV kernels
        of :mod:`workbench.kernels.lora`; ``torch``: a loop over the batch's adapters)."""
        if kernel not in self.KERNELS:
            raise ValueError(f"kernel must be one of {self.KERNELS}, got {kernel!r}")
        self.kernel = kernel
        if max_resident < 1:
            raise ValueError(f"max_resident must be >= 1, got {max_resident}")
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
        self.model = model
        self.max_resident = max_resident
        self.max_bytes = max_bytes
        self._entries: dict[str, _Entry] = {}
        self._slots: list[str | None] = []  # slot -> resident adapter name
        self._lru: OrderedDict[str, int] = OrderedDict()  # resident name -> slot, least recently used first
        self._pins: dict[int, int] = {}
        self._slot_modules: dict[int, frozenset[str]] = {}  # slot -> module paths its adapter adapts (host side)
        self.pools: dict[str, Pool] = {}
        self.r_max = 0
        self.version = 0  # bumped whenever the pools change (backends rebuild their tables)
        self._lock = threading.RLock()
        param = next(model.parameters())
        self._device, self._dtype = param.device, param.dtype  # pools in the model's dtype

    # -- registration ------------------------------------------------------------------------------

    def add(self, name: str, source: str | Path | LoraAdapter) -> LoraAdapter:
        """Register adapter ``name`` from a PEFT folder (or a loaded :class:`LoraAdapter`); it is read and checked
        against the base model now (clear :class:`AdapterError` otherwise), and becomes resident on first use."""
        if not isinstance(name, str) or not name or ":" in name or "/" in name:
            raise ValueError(f"adapter names are non-empty and contain no ':' or '/', got {name!r}")
        adapter = source if isinstance(source, LoraAdapter) else load_adapter(source, name)
        adapter.check(self.model)
        with self._lock:
            if name in self._entries:
                raise ValueError(f"adapter {name!r} is already registered (remove it first)")
            path = None if isinstance(source, LoraAdapter) else str(source)
            self._entries[name] = _Entry(path, adapter, adapter.fingerprint)  # read again after an eviction
        return adapter

    def remove(self, name: str) -> None:
        """Unregister ``name`` (refused while a running batch uses it)."""
        with self._lock:
            self._entry(name)
            slot = self._lru.get(name)
            if slot is not None:
                if self._pins.get(slot):
                    raise AdapterError(f"adapter {name!r} is in use by a running batch")
                self._evict(name)
            del self._entries[name]

    def _entry(self, name: str) -> _Entry:
        if name not in self._entries:
            raise UnknownNameError("adapter", name, list(self._entries))
        return self._entries[name]

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    @property
    def resident(self) -> list[str]:
        """Resident adapters, least recently used first."""
        return list(self._lru)

    def fingerprint(self, name: str) -> str:
        return self._entry(name).fingerprint

    def __contains__(self, name) -> bool:
        return name in self._entries

    def modules_of(self, slots) -> list[str]:
        """Module paths adapted by the adapters in ``slots`` (host-side bookkeeping: no tensor is read)."""
        return sorted(set().union(*(self._slot_modules.get(s, frozenset()) for s in slots)))

    @property
    def nbytes(self) -> int:
        """Bytes held by the pools."""
        return sum(p.a.nbytes + p.bt.nbytes for p in self.pools.values())

    # -- residency ---------------------------------------------------------------------------------

    def lease(self, names: Sequence[str | None]) -> tuple[torch.Tensor, Lease]:
        """Make every named adapter resident and pin it: ``(slot per name [len(names)] int64, -1 for None; the
        lease)``."""
        with self._lock:
            wanted = list(dict.fromkeys(n for n in names if n is not None))
            for n in wanted:
                self._entry(n)
            if len(wanted) > self.max_resident:
                raise AdapterError(f"{len(wanted)} different adapters in one batch, max_resident is "
                                   f"{self.max_resident}")
            slots: dict[str, int] = {}
            try:
                for n in wanted:
                    slots[n] = self._make_resident(n, keep=set(wanted))
                    self._pins[slots[n]] = self._pins.get(slots[n], 0) + 1
            except BaseException:
                self._unpin(tuple(slots.values()))
                raise
            idx = torch.tensor([-1 if n is None else slots[n] for n in names], dtype=torch.long, device=self._device)
            return idx, Lease(self, slots)

    def repin(self, slots: Sequence[int]) -> Lease:
        """A lease on resident ``slots`` that are pinned already (a batch rebuilt from running rows)."""
        with self._lock:
            names = {}
            for s in dict.fromkeys(slots):
                if not (0 <= s < len(self._slots)) or self._slots[s] is None or not self._pins.get(s):
                    raise AdapterError(f"slot {s} holds no adapter leased by a running batch")
                names[self._slots[s]] = s
                self._pins[s] += 1
            return Lease(self, names)

    def _unpin(self, slots: tuple[int, ...]) -> None:
        with self._lock:
            for s in slots:
                self._pins[s] -= 1
                if not self._pins[s]:
                    del self._pins[s]

    def _make_resident(self, name: str, keep: set[str]) -> int:
        if name in self._lru:
            self._lru.move_to_end(name)
            return self._lru[name]
        entry = self._entries[name]
        adapter = entry.adapter or load_adapter(entry.source, name)
        if adapter.fingerprint != entry.fingerprint:
            raise AdapterError(f"adapter {name!r} changed on disk since it was registered ({entry.source})")
        while len(self._lru) >= self.max_resident or self._over_bytes(adapter):
            victim = next((n for n, s in self._lru.items() if not self._pins.get(s) and n not in keep), None)
            if victim is None:
                raise AdapterBusyError(
                    f"cannot load adapter {name!r}: every resident adapter is in use by running batches "
                    f"(max_resident={self.max_resident}, max_bytes={self.max_bytes})")
            self._evict(victim)
        slot = self._slots.index(None) if None in self._slots else len(self._slots)
        if slot == len(self._slots):
            self._slots.append(None)
        self._slots[slot] = name
        self._lru[name] = slot
        self._rebuild({slot: adapter})
        entry.adapter = adapter
        log.info("adapter %r resident in slot %d (%d resident)", name, slot, len(self._lru))
        return slot

    def _slot_bytes(self, modules: dict[str, tuple[int, int]], r: int) -> int:
        size = torch.empty((), dtype=self._dtype).element_size()
        return sum(r * (i + o) * size for i, o in modules.values())

    def _shapes(self, extra: LoraAdapter | None = None) -> dict[str, tuple[int, int]]:
        shapes = {p: (pool.a.shape[2], pool.bt.shape[2]) for p, pool in self.pools.items()}
        if extra is not None:
            shapes.update({p: (m.a.shape[1], m.b.shape[0]) for p, m in extra.modules.items()})
        return shapes

    def _over_bytes(self, adapter: LoraAdapter) -> bool:
        """Whether the pools would exceed ``max_bytes`` with ``adapter`` in the next free slot (a hole left by an
        eviction, else a new last slot)."""
        if self.max_bytes is None:
            return False
        slots = len(self._slots) + (0 if None in self._slots else 1)
        per_slot = self._slot_bytes(self._shapes(adapter), max(self.r_max, adapter.max_rank))
        if not self._lru and per_slot > self.max_bytes:
            raise AdapterError(f"adapter {adapter.name!r} alone needs {per_slot} pool bytes > "
                               f"max_bytes={self.max_bytes}")
        return per_slot * slots > self.max_bytes

    def _evict(self, name: str) -> None:
        slot = self._lru.pop(name)
        entry = self._entries[name]
        if entry.source is not None:
            entry.adapter = None  # host memory goes too; the folder is read on the next use
        self._slots[slot] = None
        self._slot_modules.pop(slot, None)
        while self._slots and self._slots[-1] is None:
            self._slots.pop()
        S = len(self._slots)
        for path, pool in list(self.pools.items()):
            if slot < pool.ranks.shape[0]:
                pool.a[slot].zero_()
                pool.bt[slot].zero_()
                pool.ranks[slot] = 0
            if pool.a.shape[0] > S:  # trailing slots went: the pools shrink with them
                self.pools[path] = Pool(pool.a[:S].clone(), pool.bt[:S].clone(), pool.ranks[:S].clone())
        self.version += 1
        log.info("adapter %r evicted from slot %d", name, slot)

    @torch.no_grad()
    def _rebuild(self, new: dict[int, LoraAdapter]) -> None:
        """Grow the pools to the current slots / rank / modules and write the ``new`` adapters' slots."""
        S = len(self._slots)
        r_max = max([self.r_max, *(a.max_rank for a in new.values())])
        shapes = self._shapes(*new.values())
        dev = self._device
        pools = {}
        for path, (i, o) in shapes.items():
            old = self.pools.get(path)
            if old is not None and old.a.shape[0] == S and old.a.shape[1] == r_max:
                pools[path] = old
                continue
            dt = self._dtype
            p = Pool(torch.zeros(S, r_max, i, device=dev, dtype=dt), torch.zeros(S, r_max, o, device=dev, dtype=dt),
                     torch.zeros(S, dtype=torch.int32, device=dev))
            if old is not None:
                n, r = min(S, old.a.shape[0]), old.a.shape[1]
                p.a[:n, :r] = old.a[:n]
                p.bt[:n, :r] = old.bt[:n]
                p.ranks[:n] = old.ranks[:n]
            pools[path] = p
        for slot, adapter in new.items():
            for path, p in pools.items():
                p.a[slot].zero_()
                p.bt[slot].zero_()
                p.ranks[slot] = 0
                m = adapter.modules.get(path)
                if m is not None:
                    r = m.rank
                    p.a[slot, :r] = m.a.to(dev)
                    p.bt[slot, :r] = (m.b.to(dev) * m.scaling).t()  # scaled in float32, then the pool's dtype
                    p.ranks[slot] = r
            self._slot_modules[slot] = frozenset(adapter.modules)
        self.pools, self.r_max = pools, r_max
        self.version += 1
