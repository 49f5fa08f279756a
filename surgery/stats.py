"""Second-moment statistics ``C = E[k kᵀ]`` of MLP keys (the down projection's input), per layer.

ROME, MEMIT and AlphaEdit need ``C`` to keep an edit from disturbing other keys (Meng et al. 2022, eq. 2;
Meng et al. 2023, eq. 14; Fang et al. 2025, section 3). It is estimated from a local text corpus
(:mod:`workbench.data.corpus`):

- one pass over ``tokens`` corpus tokens (windows of ``seq_len``) serves every requested layer; the forward
  stops right after the last needed layer's key (`compute.StopForward` raised from its hook), so the layers
  above never run;
- the result is cached on disk per (weights fingerprint of the blocks up to the layer, layer, corpus, token
  count, window length) under ``<cache>/surgery/stats``: a second call reads the file and runs no model;
- partial sums are checkpointed every ``checkpoint_every`` batches; an interrupted pass resumes from there;
- under ``torch.distributed`` every rank reads every ``world``-th window and the sums are all-reduced.

Sums are kept in float64; the estimate is ``sum / count``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from workbench.arch import arch_of, get_module
from workbench.interp.hooks import Hooks
from workbench.paths import cache_dir as _cache_root
from workbench.surgery.compute import StopForward, down_weight

log = logging.getLogger(__name__)
FORMAT = 1


def stats_dir() -> Path:
    return _cache_root() / "surgery" / "stats"


def weights_fingerprint(model, upto_layer: int | None = None) -> str:
    """Hash of the parameters the keys up to ``upto_layer`` depend on (embeddings and blocks 0..upto_layer;
    every parameter when None)."""
    spec = arch_of(model)
    h = hashlib.blake2b(digest_size=16)
    if upto_layer is None:
        named = list(model.named_parameters())
    else:
        named = [(f"{spec.embed}.{n}", p) for n, p in get_module(model, spec.embed).named_parameters()]
        if spec.pos_embed:
            named += [(f"{spec.pos_embed}.{n}", p) for n, p in get_module(model, spec.pos_embed).named_parameters()]
        layers = get_module(model, spec.layers)
        for i in range(upto_layer + 1):
            named += [(f"{i}.{n}", p) for n, p in layers[i].named_parameters()]
    for name, p in named:
        t = p.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).reshape(-1).numpy() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class KeyStats:
    """Per-layer sums of ``k kᵀ`` (float64) and the number of keys they hold."""

    sums: dict[int, torch.Tensor]
    count: int
    corpus: str
    tokens: int

    @property
    def layers(self) -> list[int]:
        return sorted(self.sums)

    def second_moment(self, layer: int, ridge: float = 0.0) -> torch.Tensor:
        """``E[k kᵀ] + ridge · tr(E[k kᵀ]) / d · I`` in float64 (the ridge is relative to the mean eigenvalue)."""
        if layer not in self.sums:
            raise KeyError(f"no key statistics for layer {layer}; have {self.layers}")
        c = self.sums[layer] / self.count
        if ridge:
            d = c.shape[0]
            c = c + ridge * (torch.trace(c) / d) * torch.eye(d, dtype=c.dtype)
        return c


def _dist():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist, dist.get_rank(), dist.get_world_size()
    return None, 0, 1


def _windows(tok, corpus: str, n_windows: int, seq_len: int) -> Iterator[list[int]]:
    from workbench.data.corpus import iter_documents

    eos = tok.eos_token_id
    buf: list[int] = []
    made = 0
    for doc in iter_documents(corpus):
        buf += tok(doc, add_special_tokens=False, verbose=False)["input_ids"]
        if eos is not None:
            buf.append(eos)
        while len(buf) >= seq_len:
            yield buf[:seq_len]
            buf = buf[seq_len:]
            made += 1
            if made == n_windows:
                return
    raise ValueError(f"corpus {corpus!r} holds only {made * seq_len + len(buf)} tokens; asked for "
                     f"{n_windows * seq_len} (lower tokens=)")


def _key(fp: str, layer: int, corpus: str, n_windows: int, seq_len: int) -> str:
    raw = json.dumps([FORMAT, fp, layer, corpus, n_windows, seq_len])
    return hashlib.blake2b(raw.encode(), digest_size=12).hexdigest()


def _atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def compute_stats(model, tok, layers, corpus: str = "gcide", tokens: int = 100_000, *, seq_len: int = 256,
                  batch_size: int = 8, cache: bool = True, cache_dir: str | Path | None = None,
                  checkpoint_every: int = 25, progress: bool = True) -> KeyStats:
    """Key second moments for ``layers`` of ``model`` from ``tokens`` tokens of ``corpus`` (see module doc)."""
    layers = sorted(set(int(i) for i in layers))
    n_layers = model.config.num_hidden_layers
    bad = [i for i in layers if not 0 <= i < n_layers]
    if not layers or bad:
        raise ValueError(f"stats layers {layers} must be non-empty and within 0..{n_layers - 1}")
    if tokens < seq_len:
        seq_len = max(1, tokens)
    n_windows = math.ceil(tokens / seq_len)
    root = Path(cache_dir) if cache_dir is not None else stats_dir()
    keys = {i: _key(weights_fingerprint(model, i), i, corpus, n_windows, seq_len) for i in layers}
    sums: dict[int, torch.Tensor] = {}
    count = None
    if cache:
        for i in layers:
            f = root / f"{keys[i]}.pt"
            if f.is_file():
                d = torch.load(f, weights_only=True)
                sums[i], count = d["sum"], int(d["count"])
    todo = [i for i in layers if i not in sums]
    if todo:
        new, count = _run_pass(model, tok, todo, corpus, n_windows, seq_len, batch_size,
                               root / "partial" / (_key("+".join(keys[i] for i in todo), -1, corpus, n_windows,
                                                        seq_len)), checkpoint_every if cache else 0, progress)
        sums.update(new)
        _, rank, _ = _dist()
        if cache and rank == 0:
            for i in todo:
                _atomic_save({"sum": new[i], "count": count, "layer": i, "corpus": corpus,
                              "tokens": n_windows * seq_len}, root / f"{keys[i]}.pt")
    return KeyStats(sums={i: sums[i] for i in layers}, count=count, corpus=corpus, tokens=n_windows * seq_len)


@torch.no_grad()
def _run_pass(model, tok, layers, corpus, n_windows, seq_len, batch_size, partial: Path, checkpoint_every: int,
              progress: bool):
    dist, rank, world = _dist()
    part = partial.with_name(partial.name + f".rank{rank}of{world}.pt")
    sums: dict[int, torch.Tensor] = {}
    done = 0  # windows of this rank already summed
    if checkpoint_every and part.is_file():
        state = torch.load(part, weights_only=True)
        sums, done = state["sums"], int(state["done"])
        log.info("resuming key statistics from %s (%d windows done)", part, done)
    top = max(layers)

    def record(act, hook):
        a = act.detach().reshape(-1, act.shape[-1]).float()
        s = (a.T @ a).double()
        if hook.layer in sums:
            sums[hook.layer] += s
        else:
            sums[hook.layer] = s
        if hook.layer == top:
            raise StopForward

    mine = [w for j, w in enumerate(_windows(tok, corpus, n_windows, seq_len)) if j % world == rank]
    device = next(model.parameters()).device
    from tqdm.auto import tqdm

    bar = tqdm(total=len(mine), initial=done, desc=f"key stats {corpus} layers {layers}", unit="win",
               disable=not progress or rank != 0)
    batches = 0
    try:
        with Hooks(model, [(f"blocks.{i}.mlp.hook_post", record) for i in layers]):
            for start in range(done, len(mine), batch_size):
                ids = torch.tensor(mine[start:start + batch_size], device=device)
                with contextlib.suppress(StopForward):
                    model(input_ids=ids, use_cache=False)
                done = min(start + batch_size, len(mine))
                bar.update(ids.shape[0])
                batches += 1
                if checkpoint_every and batches % checkpoint_every == 0 and done < len(mine):
                    _atomic_save({"sums": sums, "done": done}, part)
    finally:
        bar.close()
    count = len(mine) * seq_len
    if not sums:  # a rank with no window (more ranks than windows)
        d_mlp = down_weight(model, layers[0]).shape[1]
        sums = {i: torch.zeros(d_mlp, d_mlp, dtype=torch.float64) for i in layers}
    if dist is not None:
        for i in layers:
            dist.all_reduce(sums[i])
        c = torch.tensor([count], dtype=torch.float64)
        dist.all_reduce(c)
        count = int(c.item())
    if part.is_file():
        part.unlink()
    return {i: sums[i].cpu() for i in layers}, count
