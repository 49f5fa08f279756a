"""Control vectors (representation engineering): one residual-stream direction per layer, trained from contrast pairs.

    from workbench.surgery.control import ControlVector, DatasetEntry
    from workbench.surgery.steer import steer

    entries = [DatasetEntry("Act as if you are extremely happy. I feel", "Act as if you are extremely sad. I feel"), ...]
    vector = ControlVector.train(model, tok, entries)              # method="pca_diff" (repeng's default)
    with steer(engine, vector, 4.0):                              # added to blocks.{i}.hook_resid_post
        engine.generate(prompts, cfg)
    vector.export_gguf("happy.gguf")                              # llama.cpp's --control-vector format

Conventions follow repeng (Vogel 2024) so that vectors, numbers and files carry over:

- a layer key ``i`` is the index of a decoder layer in ``model.layers``; its direction is added to that layer's
  output (``blocks.{i}.hook_resid_post``; repeng's ``ControlModule`` around ``layers[i]``; llama.cpp's
  ``direction.{i}``, added to ``l_out`` of block ``i``). Training reads what repeng reads, HF's
  ``hidden_states[i + 1]`` at the last token of each text: the output of layer ``i``, except for the last
  layer, for which Hugging Face return the state after the final norm.
- default layers: every layer but layer 0 (llama.cpp rejects ``direction.0``); negative indices count from
  the end (``-1`` is the last layer).
- ``pca_diff``: first principal component (centred PCA) of the positive - negative differences;
  ``pca_center``: of the states centred on each pair's mean; the sign is then chosen by majority vote, so that
  positives project higher than their negatives in most pairs (unit vectors).
- ``mean_diff``: the mean of the differences (contrastive activation addition, Rimsky et al. 2023), not
  normalised.
"""

from __future__ import annotations

import logging
import numbers
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from workbench.errors import UnknownNameError

log = logging.getLogger(__name__)

ARCH = "controlvector"  # llama.cpp's architecture name for control-vector files


@dataclass(frozen=True)
class DatasetEntry:
    """One contrast pair: the same text in the positive and the negative persona."""

    positive: str
    negative: str


@dataclass(eq=False)
class ControlVector:
    """Per-layer directions ``{layer: tensor[d]}`` (float32, CPU) for a model type (``config.model_type``).

    Arithmetic: ``v + w`` and ``v - w`` over the union of layers (a missing layer counts as zero; ``0 + v`` is
    ``v``, so ``sum(vectors)`` works), ``v * s``, ``s * v``, ``v / s`` and ``-v`` with scalars. ``v == w``:
    same model type, same layers and bit-equal values.
    """

    model_type: str
    directions: dict[int, torch.Tensor]

    def __post_init__(self):
        dirs: dict[int, torch.Tensor] = {}
        size = None
        for layer in sorted(self.directions):
            if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or layer < 0:
                raise ValueError(f"layer keys are decoder-layer indices >= 0, got {layer!r}")
            vec = torch.as_tensor(self.directions[layer]).detach().to("cpu", torch.float32).clone()  # owned
            if vec.dim() != 1:
                raise ValueError(f"direction for layer {layer} must be 1-D, got shape {tuple(vec.shape)}")
            if size is not None and vec.shape[0] != size:
                raise ValueError(f"direction for layer {layer} has size {vec.shape[0]}, others {size}")
            size = vec.shape[0]
            dirs[int(layer)] = vec
        self.directions = dirs

    # -- value semantics ----------------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        return list(self.directions)

    @property
    def d_model(self) -> int | None:
        return next(iter(self.directions.values())).shape[0] if self.directions else None

    def __eq__(self, other) -> bool:
        if not isinstance(other, ControlVector):
            return NotImplemented
        return (self.model_type == other.model_type and self.directions.keys() == other.directions.keys()
                and all(torch.equal(v, other.directions[k]) for k, v in self.directions.items()))

    __hash__ = None  # mutable value object

    def __repr__(self) -> str:
        layers = self.layers
        span = f"{layers[0]}..{layers[-1]}" if len(layers) > 2 else ", ".join(map(str, layers))
        return f"ControlVector(model_type={self.model_type!r}, layers=[{span}] ({len(layers)}), d={self.d_model})"

    def _combine(self, other: ControlVector, sign: float) -> ControlVector:
        if self.model_type != other.model_type:
            raise ValueError(f"cannot combine vectors for {self.model_type!r} and {other.model_type!r}")
        dirs = dict(self.directions)
        for layer, vec in other.directions.items():
            dirs[layer] = dirs[layer] + sign * vec if layer in dirs else sign * vec
        return ControlVector(self.model_type, dirs)

    def _scaled(self, factor) -> ControlVector:
        return ControlVector(self.model_type, {k: v * float(factor) for k, v in self.directions.items()})

    def __add__(self, other):
        if isinstance(other, ControlVector):
            return self._combine(other, 1.0)
        if _is_scalar(other) and other == 0:
            return self
        return NotImplemented

    def __radd__(self, other):
        return self.__add__(other)

    def __sub__(self, other):
        if isinstance(other, ControlVector):
            return self._combine(other, -1.0)
        if _is_scalar(other) and other == 0:
            return self
        return NotImplemented

    def __rsub__(self, other):
        if _is_scalar(other) and other == 0:
            return -self
        return NotImplemented

    def __neg__(self) -> ControlVector:
        return ControlVector(self.model_type, {k: -v for k, v in self.directions.items()})

    def __mul__(self, other):
        return self._scaled(other) if _is_scalar(other) else NotImplemented

    def __rmul__(self, other):
        return self.__mul__(other)

    def __truediv__(self, other):
        if not _is_scalar(other):
            return NotImplemented
        if float(other) == 0.0:
            raise ZeroDivisionError("control vector divided by zero")
        return self._scaled(1.0 / float(other))

    # -- training -----------------------------------------------------------------------------------------
    @classmethod
    def train(cls, model, tok, entries: Sequence[DatasetEntry], method: str = "pca_diff",
              layers: Iterable[int] | None = None, batch_size: int = 32, progress: bool = True) -> ControlVector:
        """Train a vector from contrast pairs (see the module docstring for the conventions).

        ``model``: a Hugging Face causal LM or an :class:`~workbench.engine.Engine` (its model is used);
        ``method``: an exact name from :data:`METHODS`; ``layers``: decoder-layer indices (negative from the
        end; default all but layer 0); ``batch_size``: texts per forward (a tqdm bar counts the batches).
        """
        if method not in METHODS:
            raise UnknownNameError("control-vector method", method, list(METHODS))
        model = getattr(model, "model", model) if hasattr(model, "intervene") else model
        entries = list(entries)
        if not entries or not all(isinstance(getattr(e, "positive", None), str)
                                  and isinstance(getattr(e, "negative", None), str) for e in entries):
            raise ValueError("entries must be a non-empty list of DatasetEntry (repeng's entries work too)")
        if method == "pca_diff" and len(entries) < 2:
            raise ValueError("pca_diff needs at least 2 entries (the PCA of a single difference is undefined)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        picked = resolve_layers(model, layers)
        texts = [s for e in entries for s in (e.positive, e.negative)]  # positive, negative, positive, ...
        hiddens = collect_hiddens(model, tok, texts, picked, batch_size, progress=progress)
        dirs = {layer: METHODS[method](hiddens[layer].double()).float() for layer in picked}
        log.info("trained a %s control vector on %d pairs, layers %s", method, len(entries), picked)
        return cls(model.config.model_type, dirs)

    # -- llama.cpp files ----------------------------------------------------------------------------------
    def export_gguf(self, path: str | os.PathLike) -> None:
        """Write llama.cpp's control-vector file: architecture ``controlvector``, ``controlvector.model_hint``,
        ``controlvector.layer_count`` and one float32 1-D tensor ``direction.{layer}`` per layer."""
        import gguf
        import numpy as np

        if not self.directions:
            raise ValueError("an empty control vector cannot be exported")
        if 0 in self.directions:
            raise ValueError("llama.cpp rejects direction.0 (it never steers layer 0); drop layer 0 first")
        writer = gguf.GGUFWriter(os.fspath(path), ARCH)
        try:
            writer.add_string(f"{ARCH}.model_hint", self.model_type)
            writer.add_uint32(f"{ARCH}.layer_count", len(self.directions))
            for layer, vec in self.directions.items():
                writer.add_tensor(f"direction.{layer}", np.ascontiguousarray(vec.numpy(), dtype=np.float32))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    @classmethod
    def import_gguf(cls, path: str | os.PathLike) -> ControlVector:
        """Read a llama.cpp control-vector file (ours, repeng's, llama.cpp's ``cvector-generator``'s).
        Several tensors for one layer add up, as llama.cpp loads them."""
        import gguf
        import numpy as np

        reader = gguf.GGUFReader(os.fspath(path))
        arch = _string_field(reader, "general.architecture")
        if arch is not None and arch != ARCH:
            raise ValueError(f"{os.fspath(path)}: architecture {arch!r} is not a control vector ({ARCH!r})")
        hint = _string_field(reader, f"{ARCH}.model_hint")
        if hint is None:
            raise ValueError(f"{os.fspath(path)}: no {ARCH}.model_hint field")
        dirs: dict[int, torch.Tensor] = {}
        for t in reader.tensors:
            prefix, _, index = t.name.partition(".")
            if prefix != "direction" or not index.isdigit():
                raise ValueError(f"{os.fspath(path)}: tensor {t.name!r} is not direction.N")
            if t.tensor_type != gguf.GGMLQuantizationType.F32 or len(t.shape) != 1:
                raise ValueError(f"{os.fspath(path)}: {t.name} must be a float32 1-D tensor")
            vec = torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(-1))
            layer = int(index)
            dirs[layer] = dirs[layer] + vec if layer in dirs else vec
        if not dirs:
            raise ValueError(f"{os.fspath(path)}: no direction tensors")
        return cls(hint, dirs)


def _is_scalar(x) -> bool:
    if isinstance(x, torch.Tensor):
        return x.dim() == 0
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _string_field(reader, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None or not len(field.parts):
        return None
    return bytes(field.parts[-1]).decode("utf-8", errors="replace")


# -- activations ------------------------------------------------------------------------------------------
def resolve_layers(model, layers: Iterable[int] | None) -> list[int]:
    """Decoder-layer indices, negative ones counted from the end; default: ``n-1, ..., 1`` sorted ascending."""
    from workbench.arch import layers_of

    n = len(layers_of(model))
    if layers is None:
        return list(range(1, n))
    out: list[int] = []
    for raw in layers:
        i = int(raw) + n if int(raw) < 0 else int(raw)
        if not 0 <= i < n:
            raise ValueError(f"layer {raw} out of range for a model with {n} layers")
        if i not in out:
            out.append(i)
    if not out:
        raise ValueError("layers is empty")
    return sorted(out)


def collect_hiddens(model, tok, texts: Sequence[str], layers: Sequence[int], batch_size: int = 32,
                    progress: bool = True) -> dict[int, torch.Tensor]:
    """``{layer: [len(texts), d]}`` float32 at each text's last token: what HF returns as
    ``hidden_states[layer + 1]``, read with hooks (``blocks.{layer}.hook_resid_post``; for the last layer
    ``ln_final.hook_normalized``, the state after the final norm), so the model keeps no output-capturing hooks.
    Texts are right-padded within a batch, so every state equals that of the text run alone."""
    from tqdm.auto import tqdm

    from workbench.arch import layers_of
    from workbench.interp import Hooks

    device = next(model.parameters()).device
    n_layers = len(layers_of(model))
    encoded = [tok(t)["input_ids"] for t in texts]
    if any(len(ids) == 0 for ids in encoded):
        raise ValueError("every text must have at least one token")
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    last: list[torch.Tensor] = []  # the current batch's last-token positions

    def reader(layer: int):
        def read(act, _hook):
            out[layer].append(act[torch.arange(act.shape[0], device=act.device), last[0]].float().cpu())
        return read

    hooks = [("ln_final.hook_normalized" if layer == n_layers - 1 else f"blocks.{layer}.hook_resid_post",
              reader(layer)) for layer in layers]
    starts = range(0, len(encoded), batch_size)
    with Hooks(model, hooks), torch.inference_mode():
        for start in tqdm(starts, desc="control vector: activations", unit="batch", disable=not progress):
            batch = encoded[start:start + batch_size]
            width = max(len(ids) for ids in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for r, row in enumerate(batch):
                ids[r, :len(row)] = torch.tensor(row)
                mask[r, :len(row)] = 1
            last[:] = [torch.tensor([len(row) - 1 for row in batch], device=device)]
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    return {layer: torch.cat(chunks) for layer, chunks in out.items()}


# -- methods: [2n, d] states (positive, negative, ...) -> direction [d] ------------------------------------
def first_component(x: torch.Tensor) -> torch.Tensor:
    """Unit first principal component of the rows of ``x`` (centred PCA, scikit-learn's sign convention: the
    largest-magnitude entry positive)."""
    _, _, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    v = vh[0]
    return v * torch.sign(v[v.abs().argmax()])


def vote_sign(h: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Flip ``direction`` when more positives project below their negatives than above (repeng's vote)."""
    proj = h @ direction
    pos, neg = proj[0::2], proj[1::2]
    return -direction if (pos < neg).sum() > (pos > neg).sum() else direction


def pca_diff(h: torch.Tensor) -> torch.Tensor:
    return vote_sign(h, first_component(h[0::2] - h[1::2]))


def pca_center(h: torch.Tensor) -> torch.Tensor:
    center = (h[0::2] + h[1::2]) / 2
    return vote_sign(h, first_component(h - center.repeat_interleave(2, dim=0)))


def mean_diff(h: torch.Tensor) -> torch.Tensor:
    return (h[0::2] - h[1::2]).mean(0)


METHODS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "pca_diff": pca_diff,
    "pca_center": pca_center,
    "mean_diff": mean_diff,
}
