"""Applying control vectors: residual offsets ``strength * direction`` at ``blocks.{i}.hook_resid_post``.

    with steer(engine, vector, 4.0):            # engine.intervene(offsets=...): every backend, every strategy
        engine.generate(prompts, cfg)
    with steer(model, vector, 4.0):             # a bare HF model: workbench.interp.Hooks adding the offsets
        model(ids)
    with steer(engine, [(happy, 4.0), None, (happy, -4.0)]):   # one (vector, strength) per request
        engine.generate([p0, p1, p2], cfg)

Nothing about the model changes for good: the offsets live in the engine's intervention stack or in hooks that
are removed on exit, even on error. Layer ``i``'s direction goes to the output of decoder layer ``i`` (what
repeng's ``ControlModel`` and llama.cpp's ``--control-vector`` do).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch

from workbench.surgery.control import ControlVector

log = logging.getLogger(__name__)

POINT = "hook_resid_post"
PerRequest = Sequence["tuple[ControlVector, float] | None"]


def offsets_for(vector: ControlVector, strength: float = 1.0, point: str = POINT) -> dict[str, torch.Tensor]:
    """``{"blocks.{i}.{point}": strength * direction_i}``, the engine's offset form."""
    if not isinstance(vector, ControlVector):
        raise TypeError(f"expected a ControlVector, got {type(vector).__name__}")
    return {f"blocks.{layer}.{point}": float(strength) * vec for layer, vec in vector.directions.items()}


def batch_offsets(per_request: PerRequest, point: str = POINT) -> dict[str, torch.Tensor]:
    """Offsets ``[n_requests, d]`` from one ``(vector, strength)`` (or None: unsteered) per request of a call.
    A request's row holds zeros at the layers its vector lacks."""
    items = list(per_request)
    if not items:
        raise ValueError("per_request is empty")
    vectors = []
    for item in items:
        if item is None:
            vectors.append(None)
            continue
        vec, strength = item
        if not isinstance(vec, ControlVector):
            raise TypeError(f"expected (ControlVector, strength) or None, got {item!r}")
        vectors.append(vec * float(strength))
    present = [v for v in vectors if v is not None]
    if not present:
        raise ValueError("per_request has no vector")
    sizes = {v.d_model for v in present if v.d_model is not None}
    if len(sizes) > 1:
        raise ValueError(f"vectors of different sizes in one batch: {sorted(sizes)}")
    layers = sorted({layer for v in present for layer in v.directions})
    d = sizes.pop()
    out = {}
    for layer in layers:
        rows = torch.zeros(len(vectors), d)
        for r, v in enumerate(vectors):
            if v is not None and layer in v.directions:
                rows[r] = v.directions[layer]
        out[f"blocks.{layer}.{point}"] = rows
    return out


def _check(model, vectors: Sequence[ControlVector]) -> None:
    from workbench.arch import layers_of

    n = len(layers_of(model))
    d = model.get_input_embeddings().weight.shape[1]
    model_type = model.config.model_type
    for v in vectors:
        if v.model_type != model_type:
            log.warning("control vector for %r applied to a %r model", v.model_type, model_type)
        if v.directions and max(v.directions) >= n:
            raise ValueError(f"control vector has layer {max(v.directions)}; the model has {n} layers")
        if v.d_model is not None and v.d_model != d:
            raise ValueError(f"control vector has size {v.d_model}, the residual stream {d}")


def _adder(offset: torch.Tensor):
    cache: dict[tuple, torch.Tensor] = {}

    def add(act, _hook):
        if offset.dim() == 2 and act.shape[0] != offset.shape[0]:
            raise ValueError(f"{offset.shape[0]} per-request vectors for a batch of {act.shape[0]} rows: give one "
                             "(vector, strength) or None per row")
        key = (act.device, act.dtype, act.dim())
        if key not in cache:
            off = offset.to(device=act.device, dtype=act.dtype)
            cache[key] = off if off.dim() == 1 else off.reshape(off.shape[0], *([1] * (act.dim() - 2)), -1)
        return act + cache[key]
    return add


@contextlib.contextmanager
def steer(target, vector: ControlVector | PerRequest, strength: float = 1.0, *,
          point: str = POINT) -> Iterator:
    """Steer an :class:`~workbench.engine.Engine` or a bare HF model inside the block (yields ``target``).

    ``vector``: a :class:`ControlVector` (with ``strength``), or one ``(vector, strength)`` / None per request
    (``strength`` is then ignored): for an engine, per request of each generate call; for a bare model, per row
    of the batch it is called on. ``point``: ``hook_resid_post`` (repeng's and llama.cpp's place) or
    ``hook_resid_pre``.
    """
    from workbench.engine import Engine
    from workbench.interp import Hooks

    if isinstance(vector, ControlVector):
        offsets, vectors = offsets_for(vector, strength, point), [vector]
    else:
        offsets = batch_offsets(vector, point)
        vectors = [item[0] for item in vector if item is not None]
    model = target.model if isinstance(target, Engine) else target
    _check(model, vectors)
    if isinstance(target, Engine):
        with target.intervene(offsets=offsets):
            yield target
        return
    with Hooks(model, [(name, _adder(off)) for name, off in offsets.items()]):
        yield target


# -- command line ---------------------------------------------------------------------------------------
def add_control_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--control-vector FILE`` (a llama.cpp / repeng control-vector .gguf) and ``--strength S``."""
    group = parser.add_argument_group("control vector")
    group.add_argument("--control-vector", metavar="FILE", default=None,
                       help="steer with this control vector (.gguf, llama.cpp / repeng format)")
    group.add_argument("--strength", metavar="S", type=float, default=None,
                       help="its strength: the offset is S * direction at each layer (default 1.0)")
    return parser


def control_context(args: argparse.Namespace, engine):
    """The steering context the parsed ``args`` ask for (``contextlib.nullcontext()`` without a vector)."""
    path = getattr(args, "control_vector", None)
    strength = getattr(args, "strength", None)
    if path is None:
        if strength is not None:
            raise ValueError("--strength needs --control-vector")
        return contextlib.nullcontext(engine)
    vector = ControlVector.import_gguf(path)
    log.info("steering with %s (%s) at strength %s", path, vector, 1.0 if strength is None else strength)
    return steer(engine, vector, 1.0 if strength is None else strength)
