"""Activation cache: run a model once and keep the activations at the selected hook points."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import nn

from workbench.interp.hooks import HookPoint, Hooks, NameFilter, select_names


class ActivationCache(Mapping[str, torch.Tensor]):
    """Read-only mapping name -> activation, with helpers for per-layer stacks."""

    def __init__(self, acts: dict[str, torch.Tensor]):
        self._acts = acts

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self._acts[name]
        except KeyError:
            raise KeyError(f"{name!r} is not in this cache ({len(self._acts)} names cached; pass it in names=)") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._acts)

    def __len__(self) -> int:
        return len(self._acts)

    def stack(self, kind: str) -> torch.Tensor:
        """``[n_layers, ...]`` stack of ``blocks.{i}.{kind}`` over the cached layers, in layer order."""
        layers = sorted(int(n.split(".")[1]) for n in self._acts if n.startswith("blocks.") and n.split(".", 2)[2] == kind)
        if not layers:
            raise KeyError(f"no cached blocks.*.{kind}")
        return torch.stack([self._acts[f"blocks.{i}.{kind}"] for i in layers])

    def to(self, device) -> ActivationCache:
        return ActivationCache({k: v.to(device) for k, v in self._acts.items()})


def run_with_cache(model: nn.Module, *args, names: NameFilter = None, detach: bool = True, device=None,
                   fwd_hooks=(), **kwargs) -> tuple[object, ActivationCache]:
    """Run ``model(*args, **kwargs)`` once and return ``(output, cache)``.

    ``names``: None (every hook point), one exact name, a list of exact names, or a predicate on names.
    ``detach=False`` keeps activations in the autograd graph. ``device`` moves cached tensors (e.g. "cpu").
    ``fwd_hooks`` run before caching, so the cache shows patched activations.
    """
    acts: dict[str, torch.Tensor] = {}

    def save(act: torch.Tensor, hook: HookPoint) -> None:
        t = act.detach() if detach else act
        acts[hook.name] = t.to(device) if device is not None else t

    with Hooks(model, [*fwd_hooks, *((n, save) for n in select_names(model, names))]):
        if detach:
            with torch.no_grad():
                out = model(*args, **kwargs)
        else:
            out = model(*args, **kwargs)
    return out, ActivationCache(acts)
