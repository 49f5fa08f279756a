"""What a served model is, for cache keys: its name, a fingerprint of its weights, and the interventions in
force on its engine (residual offsets such as control vectors, hooks, adapters)."""

from __future__ import annotations

import hashlib
import threading

import torch

_LOCK = threading.Lock()
_CACHE: dict[int, tuple[tuple, str]] = {}


def _state(model) -> tuple:
    return tuple((t.data_ptr(), t._version) for t in model.state_dict().values())


def weights_fingerprint(model) -> str:
    """SHA-256 over every parameter and buffer (name, dtype, shape, bytes); recomputed only when a tensor
    changed in place or was replaced (a weight edit), so it is cheap per request."""
    state = _state(model)
    with _LOCK:
        hit = _CACHE.get(id(model))
        if hit is not None and hit[0] == state:
            return hit[1]
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    digest = h.hexdigest()
    with _LOCK:
        _CACHE[id(model)] = (state, digest)
    return digest


def _tensor_digest(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    return hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}".encode() + t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def model_identity(engine, name: str) -> dict:
    iv = engine.interventions
    return {
        "name": name,
        "weights": weights_fingerprint(engine.model),
        "offsets": {k: _tensor_digest(v) for k, v in sorted(iv.offsets.items())},
        # hooks are arbitrary code: identified by their qualified names (a cache shared across differently
        # hooked servers needs distinct served names)
        "hooks": [f"{n if isinstance(n, str) else getattr(n, '__qualname__', repr(n))}:"
                  f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}" for n, fn in iv.hooks],
    }
