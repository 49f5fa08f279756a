"""Interventions: the one seam through which the engine changes what the model computes.

Four kinds, all honoured by every backend or refused with the reason:

- **residual offsets**: a vector added to the residual stream at ``blocks.{i}.hook_resid_pre`` or
  ``blocks.{i}.hook_resid_post``, one ``[d_model]`` vector for every row or ``[n_requests, d_model]``, one per
  request of the generate call (the form control vectors take). The packed backend adds them natively.
- **hooks** on :mod:`workbench.interp` hook points (``fn(activation, hook) -> Tensor | None``), given here or
  installed around the call with ``workbench.interp.Hooks``. The packed backend runs them in its own layer
  loop (every hook point but ``attn.hook_pattern``); a hook it cannot run makes ``backend="auto"`` switch to
  the model's own forward and an explicit ``backend="packed-llama"`` raise.
- **weight changes**: edit the model's parameters in place; the packed backend notices through the tensors'
  version counters and re-packs before the next request.
- **LoRA adapters**: one adapter name (or None) per request, from the engine's
  :class:`workbench.lora.AdapterRegistry`; each row adds its own adapter's low-rank terms, never merged into the
  weights. The packed backend runs adapters on q/k/v/o/gate/up/down (its fused decode loop included); an adapter
  on any other linear layer takes the model's own forward, where the terms are added by forward hooks on the
  adapted modules, present only during that forward.

At one hook point the order is: ``Hooks`` contexts on the model (oldest first), then offsets, then the
engine's hooks.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

OFFSET_POINTS = ("hook_resid_pre", "hook_resid_post")
_OFFSET_RE = re.compile(r"blocks\.(\d+)\.(hook_resid_pre|hook_resid_post)")


@dataclass(frozen=True, eq=False)
class Interventions:
    """What to change in the forward; pass to :meth:`workbench.engine.Engine.intervene`.

    ``offsets``: hook name (``blocks.{i}.hook_resid_pre`` / ``hook_resid_post``) -> tensor ``[d]`` or
    ``[n_requests, d]``. ``hooks``: ``(name or name filter, fn)`` pairs as for ``workbench.interp.Hooks``.
    ``adapters``: a registered LoRA adapter name for every request, or one name (or None) per request.
    """

    offsets: Mapping[str, torch.Tensor] = field(default_factory=dict)
    hooks: Sequence[tuple[str | Callable[[str], bool], Callable]] = ()
    adapters: str | Sequence[str | None] | None = None

    def __post_init__(self):
        for name, vec in self.offsets.items():
            if not _OFFSET_RE.fullmatch(str(name)):
                raise ValueError(f"offsets go at blocks.{{i}}.hook_resid_pre or blocks.{{i}}.hook_resid_post, "
                                 f"got {name!r}")
            if not isinstance(vec, torch.Tensor) or vec.dim() not in (1, 2):
                raise ValueError(f"offset {name!r} must be a tensor [d_model] or [n_requests, d_model]")
            if not torch.isfinite(vec).all():
                raise ValueError(f"offset {name!r} has non-finite values")
        for pair in self.hooks:
            if not (isinstance(pair, tuple) and len(pair) == 2 and callable(pair[1])):
                raise TypeError(f"hooks must be (name, fn) pairs, got {pair!r}")
        a = self.adapters
        if a is not None and not isinstance(a, str):
            if not isinstance(a, Sequence) or not all(n is None or isinstance(n, str) for n in a):
                raise TypeError(f"adapters must be a name or a list of names (or None) per request, got {a!r}")
            object.__setattr__(self, "adapters", tuple(a))

    @classmethod
    def residual(cls, vectors: Mapping[int, torch.Tensor], point: str = "hook_resid_post",
                 hooks: Sequence = ()) -> Interventions:
        """Offsets ``{layer: vector}`` at one residual point of each layer (a control vector)."""
        if point not in OFFSET_POINTS:
            raise ValueError(f"point must be one of {OFFSET_POINTS}, got {point!r}")
        return cls({f"blocks.{int(i)}.{point}": v for i, v in vectors.items()}, hooks)

    def __bool__(self) -> bool:
        return bool(self.offsets or self.hooks or self._uses_adapters)

    @property
    def _uses_adapters(self) -> bool:
        a = self.adapters
        return a is not None and (isinstance(a, str) or any(n is not None for n in a))

    def adapter_names(self, n_requests: int) -> list[str | None] | None:
        """The adapter of each of ``n_requests`` requests (None: no adapter anywhere)."""
        a = self.adapters
        if not self._uses_adapters:
            return None
        if isinstance(a, str):
            return [a] * n_requests
        if len(a) != n_requests:
            raise ValueError(f"{len(a)} adapter names for {n_requests} requests")
        return list(a)

    def merged(self, other: Interventions) -> Interventions:
        """Both: offsets at the same point add up; hooks run in order (``self``'s first). Only one of them may
        choose adapters."""
        if not other:
            return self
        if not self:
            return other
        if self._uses_adapters and other._uses_adapters:
            raise ValueError("two intervention blocks both choose LoRA adapters; choose them in one place")
        offsets = dict(self.offsets)
        for name, v in other.offsets.items():
            offsets[name] = offsets[name] + v if name in offsets else v
        adapters = self.adapters if self._uses_adapters else other.adapters
        return Interventions(offsets, (*self.hooks, *other.hooks), adapters)

    def with_adapters(self, adapters: Sequence[str | None]) -> Interventions:
        """These interventions with per-request ``adapters`` (the same offsets and hooks objects)."""
        if self._uses_adapters:
            raise ValueError("adapters are already chosen by an intervention block")
        return Interventions(self.offsets, self.hooks, tuple(adapters))


NONE = Interventions()


class Applied:
    """Interventions resolved for one batch in the KV cache: offsets as ``[rows, 1, d]`` tensors in the model's
    dtype, gathered per cache row from the request each row serves; hook contexts to run; the LoRA slot of every
    row (``lora``, with its registry and the lease that keeps those adapters resident)."""

    def __init__(self, model, iv: Interventions, requests: torch.Tensor, n_requests: int, registry=None):
        from workbench.arch import arch_of, get_module
        from workbench.interp.hooks import Hooks, active_hooks, foreign_hooks

        self.model = model
        self.iv = iv
        self.lora: RowAdapters | None = None
        names = iv.adapter_names(n_requests)
        if names is not None:
            if registry is None:
                raise ValueError("adapters were chosen but the engine has no adapter registry: build it with "
                                 "Engine(model, tok, adapters=AdapterRegistry(model))")
            slots, lease = registry.lease(names)
            self.lora = RowAdapters(registry, slots.index_select(0, requests), [lease])
        self.hooks = Hooks(model, list(iv.hooks)) if iv.hooks else None
        self._collect(active_hooks(model))  # Hooks contexts installed around the call (see refresh)
        self.foreign = foreign_hooks(model, self.external)  # raw torch hooks nobody here can replay
        self._raw: dict[tuple[int, str], torch.Tensor] = {}
        if iv.offsets:
            n_layers = len(get_module(model, arch_of(model).layers))
            emb = model.get_input_embeddings().weight
            d = emb.shape[1]
            for name, vec in iv.offsets.items():
                m = _OFFSET_RE.fullmatch(name)
                layer = int(m.group(1))
                if layer >= n_layers:
                    raise ValueError(f"offset {name!r}: the model has {n_layers} layers")
                if vec.shape[-1] != d:
                    raise ValueError(f"offset {name!r} has size {vec.shape[-1]}, the residual stream {d}")
                if vec.dim() == 2 and vec.shape[0] != n_requests:
                    raise ValueError(f"offset {name!r} has {vec.shape[0]} rows for {n_requests} requests")
                vec = vec.to(device=emb.device, dtype=emb.dtype)
                self._raw[(layer, m.group(2))] = vec[None] if vec.dim() == 1 else vec
        self.offsets: dict[tuple[int, str], torch.Tensor] = {}
        self.select(requests)

    def _collect(self, external: list) -> None:
        """The hook contexts in force and the hook points they sit on (``names``; ``kinds``: the same without
        ``blocks.{i}.``)."""
        self.external = external
        points = [p for h in (*external, *([self.hooks] if self.hooks else [])) for p in h.points.values()]
        self.names = {p.name for p in points}
        self.kinds = {p.kind for p in points}

    def refresh(self) -> None:
        """Pick up ``Hooks`` contexts opened or closed since the rows were prefilled (before every forward).
        Raw torch hooks are looked for at the prefill."""
        from workbench.interp.hooks import active_hooks

        external = active_hooks(self.model)
        if external != self.external:
            self._collect(external)

    def select(self, requests: torch.Tensor) -> None:
        """Re-gather per-request offsets for the cache rows ``requests`` (after a reorder)."""
        self.offsets = {k: (v if v.shape[0] == 1 else v.index_select(0, requests))[:, None]
                        for k, v in self._raw.items()}
        self._hf_context = None  # its offset functions hold the old rows

    def __bool__(self) -> bool:
        return bool(self.offsets or self.names or self.foreign or self.lora is not None)

    def reindex(self, index: torch.Tensor) -> None:
        """Row ``r`` becomes old row ``index[r]`` (LoRA slots follow their rows)."""
        if self.lora is not None:
            self.lora.rows = self.lora.rows.index_select(0, index)

    def can_join(self, other: Applied) -> str | None:
        """Why rows prefilled under ``other`` cannot join a batch run under these interventions (None: they can:
        the same offsets and hooks, adapters chosen per row from the same registry)."""
        if other.iv is self.iv:
            return None
        a, b = self.iv, other.iv
        if a.offsets is not b.offsets or a.hooks is not b.hooks:
            return "the joining session runs with other offsets or hooks"
        if any(v.dim() == 2 for v in a.offsets.values()):
            return "per-request offsets index requests of one generate call"
        regs = {x.lora.registry for x in (self, other) if x.lora is not None}
        if len(regs) > 1:
            return "the sessions use different adapter registries"
        return None

    def joined_rows(self, parts: list[tuple[Applied, torch.Tensor]]) -> None:
        """LoRA slots of a regrouped batch: ``parts`` are (the rows' old Applied, their old row indices)."""
        srcs = [x for x, _ in parts if x.lora is not None]
        if not srcs:
            self.lora = None
            return
        registry = srcs[0].lora.registry
        rows = torch.cat([x.lora.rows.index_select(0, r) if x.lora is not None else
                          torch.full((len(r),), -1, dtype=torch.long, device=r.device) for x, r in parts])
        # a lease on exactly the slots still in use (taken before the old leases go)
        self.lora = RowAdapters(registry, rows, [registry.repin([s for s in torch.unique(rows).tolist() if s >= 0])])

    def apply(self, name: str, layer: int | None, kind: str, act: torch.Tensor) -> torch.Tensor:
        """External hooks, then the offset, then the engine's hooks, at one hook point (packed backend)."""
        for h in self.external:
            if name in h.fns:
                act = h.apply(name, act)
        off = self.offsets.get((layer, kind)) if layer is not None else None
        if off is not None:
            act = act + off
        if self.hooks is not None and name in self.hooks.fns:
            act = self.hooks.apply(name, act)
        return act

    def hf_context(self):
        """A ``Hooks`` context running the offsets and the engine's hooks (HF backend; external contexts fire by
        themselves), or None when there are neither. Built once per row order and reused every forward."""
        if self._hf_context is None and (self.offsets or self.hooks):
            from workbench.interp.hooks import Hooks

            pairs: list[tuple[str, Callable]] = [(f"blocks.{layer}.{kind}", _adder(off))
                                                 for (layer, kind), off in self.offsets.items()]
            if self.hooks is not None:
                pairs += [(name, fn) for name, fns in self.hooks.fns.items() for fn in fns]
            self._hf_context = Hooks(self.model, pairs)
        return self._hf_context


class RowAdapters:
    """The LoRA slot of every cache row (``rows`` [B], -1: none) in ``registry``'s pools; ``leases`` keep the
    slots resident while the batch runs."""

    def __init__(self, registry, rows: torch.Tensor, leases: list):
        self.registry, self.rows, self.leases = registry, rows, leases

    def used_slots(self) -> list[int]:
        return [s for s in torch.unique(self.rows).tolist() if s >= 0]

    def modules(self) -> list[str]:
        """Module paths some row's adapter adapts (cached per row assignment and registry version)."""
        key = (self.registry.version, tuple(self.rows.tolist()))
        if getattr(self, "_modules_key", None) != key:
            self._modules = self.registry.modules_of(self.used_slots())
            self._modules_key = key
        return self._modules

    def release(self) -> None:
        for lease in self.leases:
            lease.release()


def _adder(off: torch.Tensor):
    def add(act, _hook):
        return act + off
    return add


def describe(names: Iterable[str]) -> str:
    names = sorted(names)
    return ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")
