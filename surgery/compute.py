"""Key and value vectors shared by the locate-then-edit methods (ROME, MEMIT, AlphaEdit).

- *key* ``k*``: the down projection's input (``blocks.{l}.mlp.hook_post``) at the subject's last token,
  averaged over the prompt preceded by a few short generated prefixes (Meng et al. 2022, eq. 3). r-ROME
  (Gupta et al. 2024, arXiv 2403.07175) uses this same averaged key both to build and to solve the update.
- *value shift* ``δ``: added to the MLP output (``blocks.{l}.hook_mlp_out``) at the subject's last token, and
  optimised so that the target follows the prompt in every prefixed context, while the next-token distribution
  of ``"{subject} is a"`` stays close (KL) and ``||δ||`` stays small (Meng et al. 2022, eq. 4). The wanted MLP
  output is then ``v* = W k* + δ``.

Prompts and targets are joined by :func:`workbench.surgery.requests.target_ids`.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from workbench.arch import arch_of, get_module
from workbench.interp.hooks import Hooks
from workbench.surgery.requests import EditRequest, prompt_ids, target_ids

log = logging.getLogger(__name__)
PREFIX_STARTS = ("The", "Therefore", "Because", "I", "You", "It", "In")


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def down_proj(model, layer: int):
    spec = arch_of(model)
    return get_module(get_module(model, spec.layers)[layer], spec.mlp_down)


def down_weight(model, layer: int) -> torch.Tensor:
    """The down projection's weight as a ``[d_model, d_mlp]`` map (a transposed view for GPT-2's Conv1D)."""
    w = down_proj(model, layer).weight
    return w if arch_of(model).weight_layout == "out_in" else w.T


@torch.no_grad()
def context_prefixes(model, tok, n: int, length: int, seed: int = 0) -> list[str]:
    """``[""]`` and ``n`` short texts sampled from the model (top-5 sampling, seeded per prefix), each ending
    in ". "."""
    if n <= 0:
        return [""]
    from workbench.engine import Engine, GenerationConfig, SamplingParams

    engine = Engine(model, tok, backend="hf")  # the model's own forward: nothing is repacked
    starts = [prompt_ids(tok, PREFIX_STARTS[i % len(PREFIX_STARTS)]) for i in range(n)]
    cfgs = [GenerationConfig(max_new_tokens=length, sampling=SamplingParams(temperature=1.0, top_k=5),
                             seed=seed + i, ignore_eos=True) for i in range(n)]
    out = [""]
    for start, res in zip(starts, engine.generate(starts, cfgs), strict=True):
        text = tok.decode(start + res.token_ids, skip_special_tokens=True)
        out.append(text.replace("\n", " ").replace("{", "(").replace("}", ")").strip() + ". ")
    return out


def subject_index(tok, text: str, subject_end: int) -> int:
    """Index of the token of ``text`` that holds character ``subject_end - 1`` (the subject's last character)."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc.get("offset_mapping")
    if offsets:
        for j, (a, b) in enumerate(offsets):
            if a <= subject_end - 1 < b:
                return j
    return len(prompt_ids(tok, text[:subject_end])) - 1


def subject_end(req: EditRequest, prefix: str) -> int:
    """Character offset just past the subject in ``prefix + req.text``."""
    return len(prefix) + req.template.index("{}") + len(req.subject)


class StopForward(Exception):
    """Raised from a hook once everything needed has been read: the layers above it and the LM head do not run
    (the caller suppresses it)."""


@dataclass
class Batch:
    ids: torch.Tensor  # [b, s] right-padded
    mask: torch.Tensor  # [b, s]
    subj: torch.Tensor  # [b] subject's last token index
    rows: list[tuple[int, int]]  # (request index, context index)


def _pad(seqs: list[list[int]], pad: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long, device=dev)
    mask = torch.zeros((len(seqs), width), dtype=torch.long, device=dev)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s, device=dev)
        mask[r, : len(s)] = 1
    return ids, mask


def _pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)


@torch.no_grad()
def compute_keys(model, tok, layer: int, requests: list[EditRequest], prefixes: list[str],
                 batch_size: int = 32) -> torch.Tensor:
    """``[n_requests, d_mlp]``: each request's key at ``layer`` averaged over the prefixed contexts (the forward
    stops at the key)."""
    dev = device_of(model)
    items = [(r, c) for r in range(len(requests)) for c in range(len(prefixes))]
    keys = None
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        texts = [prefixes[c] + requests[r].text for r, c in chunk]
        ids, mask = _pad([prompt_ids(tok, t) for t in texts], _pad_id(tok), dev)
        subj = [subject_index(tok, t, subject_end(requests[r], prefixes[c])) for t, (r, c) in zip(texts, chunk, strict=True)]
        got = {}

        def grab(act, hook, subj=subj, got=got):
            got["k"] = act[torch.arange(act.shape[0], device=act.device), torch.tensor(subj, device=act.device)]
            raise StopForward

        with Hooks(model, [(f"blocks.{layer}.mlp.hook_post", grab)]), contextlib.suppress(StopForward):
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        k = got["k"].float()
        if keys is None:
            keys = torch.zeros(len(requests), k.shape[-1], device=dev)
        for (r, _), row in zip(chunk, k, strict=True):
            keys[r] += row
    return keys / len(prefixes)


@torch.no_grad()
def mlp_keys(model, tok, layers, texts: list[str]) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Every position's key at each of ``layers`` for ``texts`` (right-padded as :func:`compute_keys` pads):
    ``({layer: [n, T, d_mlp] float32}, mask [n, T])``; the forward stops after the highest layer's key."""
    ids, mask = _pad([prompt_ids(tok, t) for t in texts], _pad_id(tok), device_of(model))
    top, got = max(layers), {}

    def grab(act, hook):
        got[hook.layer] = act.float()
        if hook.layer == top:
            raise StopForward

    with Hooks(model, [(f"blocks.{layer}.mlp.hook_post", grab) for layer in layers]), \
            contextlib.suppress(StopForward):
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    return got, mask


@torch.no_grad()
def hook_at_subject(model, tok, hook: str, requests: list[EditRequest]) -> torch.Tensor:
    """``[n, d]``: the activation at ``hook`` at each request's subject's last token (no prefix)."""
    dev = device_of(model)
    texts = [r.text for r in requests]
    ids, mask = _pad([prompt_ids(tok, t) for t in texts], _pad_id(tok), dev)
    subj = torch.tensor([subject_index(tok, t, subject_end(r, "")) for t, r in zip(texts, requests, strict=True)], device=dev)
    got = {}

    def grab(act, _hook):
        got["a"] = act[torch.arange(act.shape[0], device=act.device), subj].float()

    with Hooks(model, [(hook, grab)]):
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    return got["a"]


def logits_at(model, ids, mask, rows, cols) -> torch.Tensor:
    """``[len(rows), vocab]`` logits at the positions ``(rows, cols)`` only (the unembedding of the other positions
    is skipped: it is a large share of a small model's forward)."""
    hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    logits = model.get_output_embeddings()(hidden[rows, cols])
    cap = getattr(model.config, "final_logit_softcapping", None)  # Gemma 2
    return torch.tanh(logits / cap) * cap if cap else logits


@dataclass
class ValueResult:
    delta: torch.Tensor  # [d_model] shift of the MLP output at the subject's last token
    init_norm: float  # ||MLP output|| there before the edit
    nll: float  # target NLL (mean over contexts, per token) after the optimisation
    nll_start: float
    steps: int


def compute_value(model, tok, layer: int, req: EditRequest, prefixes: list[str], hp,
                  key_dir: torch.Tensor | None = None) -> ValueResult:
    """Optimise the value shift δ for one request at ``blocks.{layer}.hook_mlp_out`` (see the module doc).

    With ``key_dir`` (``[d_mlp]``, scaled so that ``key_dirᵀk* = 1``) δ is optimised through the rank-one
    update ``ΔW = δ key_dirᵀ`` itself: every position of every context gets ``(key_dirᵀk) δ`` from its own
    key ``k``, which is what the edited weights will add there, instead of δ at the subject's last token only.
    """
    dev = device_of(model)
    t_ids = target_ids(tok, req.text, req.target_new)
    seqs, subj, tgt_pos = [], [], []
    for p in prefixes:
        text = p + req.text
        pid = prompt_ids(tok, text)
        seqs.append(pid + t_ids[:-1])
        subj.append(subject_index(tok, text, subject_end(req, p)))
        tgt_pos.append(list(range(len(pid) - 1, len(pid) - 1 + len(t_ids))))
    n_rw = len(seqs)
    essence = hp.essence_template.format(req.subject)
    seqs.append(prompt_ids(tok, essence))
    subj.append(subject_index(tok, essence, hp.essence_template.index("{}") + len(req.subject)))
    ids, mask = _pad(seqs, _pad_id(tok), dev)
    b, s = ids.shape
    onehot = torch.zeros(b, s, 1, device=dev)
    onehot[torch.arange(b), torch.tensor(subj)] = 1.0
    rows = torch.tensor([r for r in range(n_rw) for _ in t_ids], device=dev)
    cols = torch.tensor([c for pos in tgt_pos for c in pos], device=dev)
    labels = torch.tensor(t_ids * n_rw, device=dev)
    ess_last = len(seqs[-1]) - 1

    d_model = model.config.hidden_size
    delta = torch.zeros(d_model, device=dev, requires_grad=True)
    state: dict = {}

    if key_dir is not None:
        key_dir = key_dir.to(dev, torch.float32)

    def read_key(act, _hook):
        state["gain"] = (act.float() @ key_dir).unsqueeze(-1)  # [b, s, 1]: key_dirᵀk at every position

    def shift(act, _hook):
        if "init" not in state:
            state["init"] = act[0, subj[0]].detach().float().clone()
        gain = onehot if key_dir is None else state.pop("gain") * mask.unsqueeze(-1)
        return act + gain.to(act.dtype) * delta.to(act.dtype)

    hooks = [(f"blocks.{layer}.hook_mlp_out", shift)]
    if key_dir is not None:
        hooks.insert(0, (f"blocks.{layer}.mlp.hook_post", read_key))
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    ref_logp = None
    nll_start = nll_val = float("nan")
    step = 0
    with Hooks(model, hooks):
        for step in range(hp.v_steps + 1):
            logits = logits_at(model, ids, mask, torch.cat([rows, rows.new_tensor([b - 1])]),
                               torch.cat([cols, cols.new_tensor([ess_last])]))
            logp = torch.log_softmax(logits.float(), dim=-1)
            nll = -logp[torch.arange(len(labels), device=dev), labels].sum() / (n_rw * len(t_ids))
            ess = logp[-1]
            if ref_logp is None:
                ref_logp = ess.detach()
            kl = torch.nn.functional.kl_div(ess, ref_logp, log_target=True, reduction="sum")
            init_norm = state["init"].norm()
            wd = hp.v_weight_decay * delta.norm() ** 2 / init_norm.clamp(min=1e-8) ** 2
            loss = nll + hp.kl_factor * kl + wd
            nll_val = float(nll.detach())
            if step == 0:
                nll_start = nll_val
            if nll_val < hp.stop_loss or step == hp.v_steps:
                break
            (grad,) = torch.autograd.grad(loss, [delta])
            delta.grad = grad
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():  # keep ||δ|| within clamp_norm_factor * ||initial MLP output||
                cap = hp.clamp_norm_factor * init_norm
                if delta.norm() > cap:
                    delta.mul_(cap / delta.norm())
    log.info("value for %s at layer %d: target NLL %.3f -> %.3f in %d steps, |δ| %.2f (|v| %.2f)",
             req.label(), layer, nll_start, nll_val, step, float(delta.detach().norm()), float(state["init"].norm()))
    return ValueResult(delta.detach().clone(), float(state["init"].norm()), nll_val, nll_start, step)
