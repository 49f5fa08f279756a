"""Apply, undo, save and reload knowledge edits.

    res = edit_model(model, tok, [req], method="rome")   # in place; res.undo() restores bit-exactly
    with edit_model(model, tok, [req], method="memit") as res: ...   # undone on exit, also on error
    res.save("edit/"); load_edit("edit/").apply(fresh_model)

Every request and every layer is validated before any weight changes; a method that fails half-way restores
what it changed. Weights are changed in place (``param.add_`` / ``copy_`` under ``no_grad``; not through
``param.data``, whose in-place changes leave the parameter's version counter alone), so every engine backend,
the packed one included (it repacks when a tensor's ``_version`` changes), sees the edit at its next call. :class:`Editor` keeps state across calls (statistics, prefixes, AlphaEdit's
accumulated keys) for sequential editing.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workbench.arch import arch_of
from workbench.errors import UnknownNameError, WorkbenchError
from workbench.surgery import hparams as H
from workbench.surgery.alphaedit import apply_alphaedit
from workbench.surgery.compute import context_prefixes, down_proj
from workbench.surgery.ft import apply_ft
from workbench.surgery.memit import apply_memit
from workbench.surgery.requests import EditRequest, as_requests
from workbench.surgery.rome import apply_rome
from workbench.surgery.stats import KeyStats, compute_stats, weights_fingerprint

log = logging.getLogger(__name__)
FORMAT = 1
DELTAS_FILE, MANIFEST_FILE = "deltas.safetensors", "manifest.json"

# exact names; each takes (editor, requests, weights) and changes the weights through ``weights``
METHODS = {"rome": apply_rome, "memit": apply_memit, "alphaedit": apply_alphaedit, "ft": apply_ft}
NEEDS_STATS = {"rome", "memit", "alphaedit"}


class EditError(WorkbenchError, ValueError):
    """An edit that cannot be saved, loaded or applied to this model."""


def _method(name: str):
    if name not in METHODS:
        raise UnknownNameError("editing method", name, list(METHODS))
    return METHODS[name]


def _param_name(model, layer: int) -> str:
    spec = arch_of(model)
    return f"{spec.layers}.{layer}.{spec.mlp_down}.weight"


class WeightChanges:
    """The down-projection weights one edit touches: originals kept for a bit-exact undo."""

    def __init__(self, model):
        self.model = model
        self.originals: dict[str, torch.Tensor] = {}
        self.params: dict[str, torch.nn.Parameter] = {}

    def track(self, layer: int) -> torch.nn.Parameter:
        name = _param_name(self.model, layer)
        p = down_proj(self.model, layer).weight
        if name not in self.originals:
            self.originals[name] = p.detach().clone()
            self.params[name] = p
        return p

    @torch.no_grad()
    def add(self, layer: int, dw: torch.Tensor) -> None:
        """Add ``dw`` (``[d_model, d_mlp]``, the map k -> v) to layer ``layer``'s down projection, in place."""
        p = self.track(layer)
        if arch_of(self.model).weight_layout == "in_out":
            dw = dw.T
        p.add_(dw.to(device=p.device, dtype=p.dtype))

    def deltas(self) -> dict[str, torch.Tensor]:
        return {n: (self.params[n].detach() - o).contiguous() for n, o in self.originals.items()}

    @torch.no_grad()
    def restore(self) -> None:
        for n, o in self.originals.items():
            self.params[n].copy_(o)


def _evaluate(model, tok, requests, reference=None):
    """``(metrics object, its dict)`` from ``workbench.surgery.metrics`` (``(None, None)`` when absent)."""
    try:
        from workbench.surgery.metrics import evaluate_requests
    except ImportError:
        log.warning("workbench.surgery.metrics is not available: no metrics")
        return None, None
    kw = {"reference": reference} if reference is not None else {}
    m = evaluate_requests(model, tok, requests, **kw)
    return m, m.to_dict()


@dataclass
class EditResult:
    """What one edit did. ``deltas``: per parameter name, the full ``new - original`` tensor (parameter layout)."""

    method: str
    requests: list[EditRequest]
    hparams: object
    deltas: dict[str, torch.Tensor]
    model_fingerprint: str
    metrics: dict | None = None
    info: dict = field(default_factory=dict)
    seconds: float = 0.0
    _model: object = field(default=None, repr=False)
    _originals: dict = field(default_factory=dict, repr=False)
    _params: dict = field(default_factory=dict, repr=False)
    _versions: dict = field(default_factory=dict, repr=False)
    undone: bool = False

    def undo(self) -> None:
        """Restore the original weights of the edited tensors (bit-exact); a second call does nothing."""
        if self.undone:
            return
        changed = [n for n, p in self._params.items() if p._version != self._versions[n]]
        if changed:
            log.warning("tensors %s changed after this edit; undo restores their values from before it", changed)
        with torch.no_grad():
            for n, o in self._originals.items():
                self._params[n].copy_(o)
        self.undone = True

    def __enter__(self) -> EditResult:
        return self

    def __exit__(self, *exc) -> None:
        self.undo()

    def to_manifest(self) -> dict:
        return {"format": FORMAT, "method": self.method, "hparams": H.hparams_to_dict(self.hparams),
                "requests": [r.to_dict() for r in self.requests], "model_fingerprint": self.model_fingerprint,
                "model_type": self._model.config.model_type if self._model is not None else None,
                "shapes": {n: list(d.shape) for n, d in self.deltas.items()},
                "dtypes": {n: str(d.dtype).removeprefix("torch.") for n, d in self.deltas.items()},
                "metrics": self.metrics, "info": self.info}

    def save(self, path) -> Path:
        """Write ``deltas.safetensors`` and ``manifest.json`` into the folder ``path``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({n: d.detach().cpu().contiguous() for n, d in self.deltas.items()}, str(path / DELTAS_FILE))
        (path / MANIFEST_FILE).write_text(json.dumps(self.to_manifest(), indent=1, default=str))
        return path

    def export_hf(self, directory, tokenizer=None):
        """Save the edited model as a Hugging Face folder (``workbench.export.save_hf``)."""
        from workbench.export import save_hf

        return save_hf(self._model, tokenizer if tokenizer is not None else self._tokenizer, directory)

    def export_gguf(self, path, dtype: str = "f16", tokenizer=None):
        """Save the edited model as GGUF (``workbench.export.save_gguf``)."""
        from workbench.export import save_gguf

        return save_gguf(self._model, tokenizer if tokenizer is not None else self._tokenizer, path, dtype=dtype)

    _tokenizer: object = None


def _resolve_hparams(method: str, model, hparams):
    if hparams is None or isinstance(hparams, dict):
        return H.load_hparams(method, model, overrides=hparams)
    if isinstance(hparams, (str, Path)):
        return H.load_hparams(method, path=hparams)
    if not isinstance(hparams, H.HPARAMS[method]):
        raise H.HparamsError(f"method {method!r} takes {H.HPARAMS[method].__name__}, got {type(hparams).__name__}")
    return hparams


class Editor:
    """Edits one model with one method, possibly many times; keeps statistics, context prefixes and AlphaEdit's
    accumulated keys of earlier edits across :meth:`apply` calls.

    ``stats``: None (computed from ``hparams.stats`` on first need, cached on disk), a :class:`KeyStats`, a
    ``{layer: E[kkᵀ]}`` dict, or a :class:`~workbench.surgery.hparams.StatsConfig`.
    """

    def __init__(self, model, tok, method: str = "rome", hparams=None, stats=None, progress: bool = True):
        self._fn = _method(method)
        self.model, self.tok, self.method = model, tok, method
        self.hparams = _resolve_hparams(method, model, hparams)
        H.validate_layers(self.hparams, model)
        self.progress = progress
        self._stats = stats
        self._cache: dict = {}
        self.state: dict = {}
        self.history: list[EditResult] = []

    # -- shared state ---------------------------------------------------------------------------------------
    def cached(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def prefixes(self) -> list[str]:
        hp = self.hparams
        return self.cached(("prefixes",), lambda: context_prefixes(self.model, self.tok, hp.n_prefixes,
                                                                   hp.prefix_len, hp.seed))

    def _ensure_stats(self) -> None:
        if self.method not in NEEDS_STATS:
            return
        st, layers = self._stats, list(self.hparams.layers)
        if isinstance(st, KeyStats) or (isinstance(st, dict) and st):
            have = st.layers if isinstance(st, KeyStats) else sorted(st)
            missing = [i for i in layers if i not in have]
            if missing:
                raise H.HparamsError(f"the given statistics lack layers {missing} (have {have})")
            return
        cfg = st if isinstance(st, H.StatsConfig) else self.hparams.stats
        self._stats = compute_stats(self.model, self.tok, layers, corpus=cfg.corpus, tokens=cfg.tokens,
                                    seq_len=cfg.seq_len, batch_size=cfg.batch_size, progress=self.progress)

    def second_moment(self, layer: int, ridge: float = 0.0) -> torch.Tensor:
        def make():
            st = self._stats
            if isinstance(st, KeyStats):
                return st.second_moment(layer, ridge)
            c = st[layer].double()
            return c + ridge * torch.trace(c) / c.shape[0] * torch.eye(c.shape[0], dtype=c.dtype) if ridge else c
        return self.cached(("C", layer, ridge), make)

    # -- editing --------------------------------------------------------------------------------------------
    def validate(self, requests) -> list[EditRequest]:
        reqs = as_requests(requests)
        for r in reqs:
            r.validate(self.tok)
        H.validate_layers(self.hparams, self.model)
        return reqs

    def apply(self, requests, evaluate: bool = False) -> EditResult:
        """Validate, then edit the model in place; returns the :class:`EditResult` (``.undo()`` reverts it)."""
        reqs = self.validate(requests)
        self._ensure_stats()
        t0 = time.perf_counter()
        fingerprint = weights_fingerprint(self.model)
        pre_obj, pre = _evaluate(self.model, self.tok, reqs) if evaluate else (None, None)
        changes = WeightChanges(self.model)
        try:
            info = self._fn(self, reqs, changes)
        except BaseException:
            changes.restore()
            raise
        # locality compares with the unedited model's predictions
        ref = pre_obj.reference() if hasattr(pre_obj, "reference") else None
        post = _evaluate(self.model, self.tok, reqs, reference=ref)[1] if evaluate else None
        res = EditResult(method=self.method, requests=reqs, hparams=self.hparams, deltas=changes.deltas(),
                         model_fingerprint=fingerprint, metrics={"pre": pre, "post": post} if evaluate else None,
                         info=info, seconds=time.perf_counter() - t0, _model=self.model,
                         _originals=changes.originals, _params=changes.params,
                         _versions={n: p._version for n, p in changes.params.items()})
        res._tokenizer = self.tok
        self.history.append(res)
        log.info("%s edit of %d request(s) in %.1f s", self.method, len(reqs), res.seconds)
        return res

    def undo_all(self) -> None:
        """Undo every edit of this editor, newest first, and forget AlphaEdit's accumulated keys."""
        for res in reversed(self.history):
            res.undo()
        self.history.clear()
        self.state.clear()


def edit_model(model, tok, requests, method: str = "rome", hparams=None, evaluate: bool = True, stats=None,
               progress: bool = True) -> EditResult:
    """Edit ``model`` in place with ``method`` (``"rome"``, ``"memit"``, ``"alphaedit"``, ``"ft"``).

    ``hparams``: None (the model's defaults file), a dict of overrides, a path to a JSON file, or the method's
    dataclass. ``evaluate``: measure the requests before and after (``workbench.surgery.metrics``).
    """
    return Editor(model, tok, method, hparams, stats, progress).apply(requests, evaluate=evaluate)


@dataclass
class SavedEdit:
    """A saved edit (see :func:`load_edit`); :meth:`apply` re-applies its deltas to a model."""

    manifest: dict
    deltas: dict[str, torch.Tensor]

    @property
    def method(self) -> str:
        return self.manifest["method"]

    @property
    def requests(self) -> list[EditRequest]:
        return [EditRequest.from_dict(r) for r in self.manifest["requests"]]

    def apply(self, model, check_fingerprint: bool = True) -> EditResult:
        params = dict(model.named_parameters())
        for n, d in self.deltas.items():
            if n not in params:
                raise EditError(f"the saved edit changes {n!r}, which this model ({model.config.model_type}) lacks")
            if tuple(params[n].shape) != tuple(d.shape):
                raise EditError(f"the saved edit's {n} has shape {tuple(d.shape)}; this model's is "
                                f"{tuple(params[n].shape)}: a different model")
        fp = weights_fingerprint(model)
        if check_fingerprint and fp != self.manifest["model_fingerprint"]:
            raise EditError("the model's weights differ from those the edit was made on (fingerprint "
                            f"{fp[:12]} != {self.manifest['model_fingerprint'][:12]}); pass "
                            "check_fingerprint=False to apply anyway")
        originals, touched = {}, {}
        with torch.no_grad():
            for n, d in self.deltas.items():
                p = params[n]
                originals[n], touched[n] = p.detach().clone(), p
                p.add_(d.to(device=p.device, dtype=p.dtype))
        hp = H.hparams_from_dict(self.method, self.manifest["hparams"])
        return EditResult(method=self.method, requests=self.requests, hparams=hp, deltas=dict(self.deltas),
                          model_fingerprint=fp, metrics=self.manifest.get("metrics"),
                          info=self.manifest.get("info") or {}, _model=model, _originals=originals,
                          _params=touched, _versions={n: p._version for n, p in touched.items()})


def load_edit(path) -> SavedEdit:
    """Read a folder written by :meth:`EditResult.save`."""
    from safetensors.torch import load_file

    path = Path(path)
    man, dl = path / MANIFEST_FILE, path / DELTAS_FILE
    if not man.is_file() or not dl.is_file():
        raise EditError(f"{path} is not a saved edit (needs {MANIFEST_FILE} and {DELTAS_FILE})")
    manifest = json.loads(man.read_text())
    if manifest.get("format") != FORMAT:
        raise EditError(f"{path}: unsupported saved-edit format {manifest.get('format')!r} (expected {FORMAT})")
    return SavedEdit(manifest, load_file(str(dl)))


__all__ = ["EditResult", "Editor", "METHODS", "SavedEdit", "edit_model", "load_edit"]
