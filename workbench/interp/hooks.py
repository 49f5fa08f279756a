"""Named hook points on Hugging Face models: read or replace activations, always removed afterwards.

    with Hooks(model, [("blocks.3.hook_resid_post", fn)]):
        model(ids)

A hook function is ``fn(activation, hook) -> Tensor | None`` (TransformerLens' signature): return a tensor
of the same shape to replace the activation, or None to leave it. ``hook`` is the :class:`HookPoint`.

Names (TransformerLens' spelling, shapes for a ``[batch, seq]`` input):

- ``hook_embed`` token embeddings; ``hook_pos_embed`` learned positions (GPT-2 only)
- ``blocks.{i}.hook_resid_pre`` / ``hook_resid_mid`` / ``hook_resid_post``  ``[b, s, d_model]``
- ``blocks.{i}.hook_attn_out`` / ``hook_mlp_out``: what attention / the MLP add to the residual
- ``blocks.{i}.mlp.hook_post``: MLP hidden activation (input of the down projection) ``[b, s, d_mlp]``
- ``blocks.{i}.attn.hook_z``: per-head attention output before the output projection ``[b, s, heads, d_head]``
- ``blocks.{i}.attn.hook_pattern``: attention probabilities ``[b, heads, q, k]`` (read-only; switches the
  model to eager attention while installed and back afterwards)
- ``ln_final.hook_normalized``: output of the final norm
"""

from __future__ import annotations

import difflib
import re
import threading
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from workbench.interp.arch import ArchSpec, arch_of, get_module

BLOCK_KINDS = (
    "hook_resid_pre", "attn.hook_z", "attn.hook_pattern", "hook_attn_out", "hook_resid_mid",
    "mlp.hook_post", "hook_mlp_out", "hook_resid_post",
)
READ_ONLY = ("attn.hook_pattern",)
_BLOCK_RE = re.compile(r"blocks\.(\d+)\.(.+)")
# Hooks contexts currently installed, per model: the engine's packed backend runs their functions itself.
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, list[Hooks]] = weakref.WeakKeyDictionary()
_ACTIVE_LOCK = threading.Lock()


@dataclass(frozen=True)
class HookPoint:
    name: str
    layer: int | None  # None for hook_embed, hook_pos_embed, ln_final.hook_normalized
    kind: str  # the name without "blocks.{i}."


HookFn = Callable[[torch.Tensor, HookPoint], "torch.Tensor | None"]
NameFilter = "str | Iterable[str] | Callable[[str], bool] | None"


def hook_names(model: nn.Module) -> list[str]:
    """All hook point names of ``model``, in the order they fire."""
    spec = arch_of(model)
    n_layers = len(get_module(model, spec.layers))
    names = ["hook_embed"] + (["hook_pos_embed"] if spec.pos_embed else [])
    for i in range(n_layers):
        names += [f"blocks.{i}.{k}" for k in BLOCK_KINDS]
    return names + ["ln_final.hook_normalized"]


def hook_point(model: nn.Module, name: str) -> HookPoint:
    """Parse and validate one name (clear error with suggestions for a wrong one)."""
    valid = hook_names(model)
    if name not in valid:
        close = difflib.get_close_matches(name, valid, n=3)
        hint = f"; did you mean {close}?" if close else ""
        raise KeyError(f"unknown hook point {name!r} for {model.config.model_type} "
                       f"({len(valid)} names, e.g. 'blocks.0.hook_resid_pre'){hint}")
    m = _BLOCK_RE.fullmatch(name)
    if m:
        return HookPoint(name, int(m.group(1)), m.group(2))
    return HookPoint(name, None, name)


def select_names(model: nn.Module, names: NameFilter) -> list[str]:
    """Resolve a name filter (None = all, exact name, list of exact names, or predicate) to names."""
    if names is None:
        return hook_names(model)
    if isinstance(names, str):
        return [hook_point(model, names).name]
    if callable(names):
        picked = [n for n in hook_names(model) if names(n)]
        if not picked:
            raise ValueError("the name filter matched no hook point")
        return picked
    return [hook_point(model, n).name for n in names]


def _tensor_of(output):
    return output[0] if isinstance(output, tuple) else output


def _with_tensor(output, tensor):
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor


class Hooks:
    """Context manager installing named hooks; every torch handle is removed on exit, even on error.

    ``fwd_hooks`` is a list of ``(name_or_filter, fn)``; a filter (callable) expands to every matching
    name. Several functions on one name run in the given order, each seeing the previous one's result.
    """

    def __init__(self, model: nn.Module, fwd_hooks: Iterable[tuple[str | Callable[[str], bool], HookFn]]):
        self.model = model
        self.spec: ArchSpec = arch_of(model)
        self.fns: dict[str, list[HookFn]] = defaultdict(list)
        for name, fn in fwd_hooks:
            if not callable(fn):
                raise TypeError(f"hook for {name!r} is not callable: {fn!r}")
            for n in select_names(model, name):
                self.fns[n].append(fn)
        self.points = {n: hook_point(model, n) for n in self.fns}
        self._handles: list = []
        self._attn_impl: str | None = None
        self._state: dict[int, torch.Tensor] = {}

    # -- installation -------------------------------------------------------------------------------------
    def __enter__(self) -> Hooks:
        try:
            self._install()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        with _ACTIVE_LOCK:
            active = _ACTIVE.get(self.model, [])
            if self in active:
                active.remove(self)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._state.clear()
        if self._attn_impl is not None:
            self.model.set_attn_implementation(self._attn_impl)
            self._attn_impl = None

    @property
    def handle_ids(self) -> set[int]:
        """Ids of the torch hooks this context registered (see :func:`foreign_hooks`)."""
        return {h.id for h in self._handles}

    def apply(self, name: str, act: torch.Tensor) -> torch.Tensor:
        """Run the functions installed on ``name`` over ``act`` (in order) and return the result."""
        return self._apply(name, act)

    def _apply(self, name: str, act: torch.Tensor) -> torch.Tensor:
        point = self.points[name]
        for fn in self.fns[name]:
            out = fn(act, point)
            if out is None:
                continue
            if point.kind in READ_ONLY:
                raise ValueError(f"{name} is read-only: its hook function must return None")
            if not isinstance(out, torch.Tensor) or out.shape != act.shape:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"hook on {name} must return None or a tensor of shape {tuple(act.shape)}, got {got}")
            act = out
        return act

    def _add(self, handle) -> None:
        self._handles.append(handle)

    def _install(self) -> None:
        spec, model = self.spec, self.model
        if any(p.kind == "attn.hook_pattern" for p in self.points.values()):
            impl = model.config._attn_implementation
            if impl != "eager":
                model.set_attn_implementation("eager")
                self._attn_impl = impl
        for name, path in (("hook_embed", spec.embed), ("hook_pos_embed", spec.pos_embed),
                           ("ln_final.hook_normalized", spec.final_norm)):
            if name in self.fns:
                self._add(get_module(model, path).register_forward_hook(self._output_hook(name)))
        kinds_by_layer: dict[int, set[str]] = defaultdict(set)
        for p in self.points.values():
            if p.layer is not None:
                kinds_by_layer[p.layer].add(p.kind)
        layers = get_module(model, spec.layers)
        for i, kinds in sorted(kinds_by_layer.items()):
            self._install_block(i, layers[i], kinds)
        with _ACTIVE_LOCK:
            _ACTIVE.setdefault(model, []).append(self)

    def _output_hook(self, name: str):
        def hook(_module, _args, output):
            return _with_tensor(output, self._apply(name, _tensor_of(output)))
        return hook

    def _install_block(self, i: int, block: nn.Module, kinds: set[str]) -> None:
        spec, name = self.spec, (lambda kind: f"blocks.{i}.{kind}")
        if "hook_resid_pre" in kinds:
            def pre(_module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                hidden = self._apply(name("hook_resid_pre"), hidden)
                if args:
                    return (hidden, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": hidden}
            self._add(block.register_forward_pre_hook(pre, with_kwargs=True))
        if "hook_resid_mid" in kinds:
            # the residual the block really adds attention to: the input of its first norm, after every hook on
            # the block's input (this context's and any other's)
            def keep_input(_module, args):
                self._state[i] = args[0]
            self._add(get_module(block, spec.resid_in).register_forward_pre_hook(keep_input))
        if "attn.hook_z" in kinds:
            o_proj = get_module(block, spec.o_proj)
            n_heads = self.model.config.num_attention_heads

            def z_hook(_module, args):
                x = args[0]
                z = x.reshape(*x.shape[:-1], n_heads, x.shape[-1] // n_heads)
                return (self._apply(name("attn.hook_z"), z).reshape(x.shape), *args[1:])
            self._add(o_proj.register_forward_pre_hook(z_hook))
        if "attn.hook_pattern" in kinds:
            def pattern_hook(_module, _args, output):
                if not isinstance(output, tuple) or output[1] is None:
                    raise RuntimeError(f"blocks.{i}: the attention module returned no weights")
                self._apply(name("attn.hook_pattern"), output[1])
            self._add(get_module(block, spec.attn).register_forward_hook(pattern_hook))
        if kinds & {"hook_attn_out", "hook_resid_mid"}:
            def attn_out_hook(_module, _args, output):
                out = _tensor_of(output)
                if "hook_attn_out" in kinds:
                    out = self._apply(name("hook_attn_out"), out)
                if "hook_resid_mid" in kinds:
                    # The block adds the attention output to its input; resid_mid is that sum (bit-exact with
                    # the block's own addition). A replacement is folded back into the attention output.
                    pre = self._state[i]
                    mid = pre + out
                    new_mid = self._apply(name("hook_resid_mid"), mid)
                    if new_mid is not mid:
                        out = new_mid - pre
                return _with_tensor(output, out)
            self._add(get_module(block, spec.attn_out).register_forward_hook(attn_out_hook))
        if "mlp.hook_post" in kinds:
            def mlp_post(_module, args):
                return (self._apply(name("mlp.hook_post"), args[0]), *args[1:])
            self._add(get_module(block, spec.mlp_down).register_forward_pre_hook(mlp_post))
        if "hook_mlp_out" in kinds:
            self._add(get_module(block, spec.mlp_out).register_forward_hook(self._output_hook(name("hook_mlp_out"))))
        if "hook_resid_post" in kinds:
            self._add(block.register_forward_hook(self._output_hook(name("hook_resid_post"))))


def run_with_hooks(model: nn.Module, *args, fwd_hooks=(), **kwargs):
    """``model(*args, **kwargs)`` with ``fwd_hooks`` installed for this one call."""
    with Hooks(model, fwd_hooks):
        return model(*args, **kwargs)


def active_hooks(model: nn.Module) -> list[Hooks]:
    """The :class:`Hooks` contexts installed on ``model`` now, in installation order."""
    with _ACTIVE_LOCK:
        return list(_ACTIVE.get(model, []))


def foreign_hooks(model: nn.Module, known: Iterable[Hooks] = ()) -> list[str]:
    """Names of submodules carrying torch forward (pre-)hooks that none of ``known`` registered."""
    ids = set().union(*(h.handle_ids for h in known))
    out = []
    for name, m in model.named_modules():
        hooks = {**m._forward_hooks, **m._forward_pre_hooks}
        if any(i not in ids and not _inert(fn) for i, fn in hooks.items()):
            out.append(name or "<model>")
    return out


def _inert(fn) -> bool:
    """transformers installs output-capturing hooks for ``output_hidden_states`` / ``output_attentions`` (once
    asked, for good); they record nothing unless a forward asks for those outputs, which the engine never does."""
    return getattr(fn, "__module__", "") == "transformers.utils.output_capturing"


def count_hooks(model: nn.Module) -> int:
    """Torch hooks currently registered on any submodule (0 when nothing is installed)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
