"""Activation store: stream real text through the model and serve shuffled activation batches.

Windows of ``context_size`` tokens come lazily from corpus sources (``workbench.data``); the model runs only
up to the hook point (a stop signal ends the forward there). Activations go into a buffer that is refilled
when half empty and shuffled, so a batch mixes many documents. Every ``holdout_every``-th window is kept out
of training and served by :meth:`ActivationStore.eval_windows`.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from workbench.interp.hooks import Hooks, hook_point


@dataclass
class StoreConfig:
    hook_name: str
    sources: tuple[str, ...] = ("gcide",)
    context_size: int = 128
    batch_size: int = 4096  # activations per training batch
    buffer_batches: int = 16  # buffer capacity in batches
    windows_per_forward: int = 16
    exclude_first: int = 1  # positions dropped at the start of each window (attention-sink outliers)
    holdout_every: int = 20  # every n-th window is reserved for evaluation (0: none)
    autocast: str | None = None  # e.g. "bfloat16": run the model under torch.autocast (activations stay float32)
    # Drop "massive activations" (Sun et al. 2024): tokens whose norm exceeds this multiple of the median norm of
    # their forward batch. A few such tokens (norm ~100x typical) would dominate the MSE. None keeps everything.
    outlier_ratio: float | None = 10.0
    mix: str = "proportional"  # how sources are interleaved (see _documents)
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.sources, str):
            self.sources = (self.sources,)
        if not 0 <= self.exclude_first < self.context_size:
            raise ValueError(f"exclude_first must be in [0, context_size), got {self.exclude_first}")
        if self.mix not in MIXES:
            raise ValueError(f"unknown mix {self.mix!r}; choose one of {MIXES}")
        if self.batch_size < 1 or self.buffer_batches < 2:
            raise ValueError("batch_size must be >= 1 and buffer_batches >= 2")


def inlier_mask(acts: torch.Tensor, ratio: float | None) -> torch.Tensor:
    """True where a token's activation norm is at most ``ratio`` x the median norm (all True if ratio is None)."""
    norms = acts.norm(dim=-1)
    if ratio is None:
        return torch.ones_like(norms, dtype=torch.bool)
    return norms <= ratio * norms.median()


class _Stop(Exception):
    pass


def activations_at(model: nn.Module, input_ids: torch.Tensor, hook_name: str, *,
                   autocast: str | None = None) -> torch.Tensor:
    """Activations at one hook point, running the model only as far as needed (float32 out).

    ``autocast="bfloat16"`` runs the matmuls in bfloat16 without touching the model's weights
    (about 4x faster on CPUs with AMX; activations differ from float32 by bfloat16 rounding).
    """
    hook_point(model, hook_name)
    got: list[torch.Tensor] = []

    def grab(act, _hook):
        got.append(act.detach().float())
        raise _Stop

    dtype = getattr(torch, autocast) if autocast else None
    try:
        with Hooks(model, [(hook_name, grab)]), torch.no_grad(), \
                torch.autocast(input_ids.device.type, dtype=dtype, enabled=dtype is not None):
            model(input_ids)
    except _Stop:
        pass
    if not got:
        raise RuntimeError(f"{hook_name} did not fire")
    return got[0]


MIXES = ("proportional", "round-robin")


def _documents(sources: tuple[str, ...], mix: str = "proportional", seed: int = 0) -> Iterator[str]:
    """Documents of several sources in one stream.

    ``proportional``: each next document comes from a source drawn with probability proportional to its
    remaining documents (a first pass counts them), so every source is spread evenly over the whole stream
    and a prefix of the stream (e.g. held-out windows) looks like the rest. ``round-robin``: one from each in
    turn (no counting pass; small sources run out early, so the mix drifts).
    """
    from workbench.data.corpus import iter_documents

    if mix not in MIXES:
        raise ValueError(f"unknown mix {mix!r}; choose one of {MIXES}")
    if mix == "round-robin":
        active = [iter_documents(s) for s in sources]
        while active:
            for it in list(active):
                doc = next(it, None)
                if doc is None:
                    active.remove(it)
                else:
                    yield doc
        return
    remaining = [sum(1 for _ in iter_documents(s)) for s in sources]
    iters = [iter_documents(s) for s in sources]
    rng = random.Random(seed)
    while sum(remaining):
        (i,) = rng.choices(range(len(sources)), weights=remaining)
        remaining[i] -= 1
        doc = next(iters[i], None)
        if doc is not None:
            yield doc


class ActivationStore:
    def __init__(self, model: nn.Module, tokenizer, cfg: StoreConfig, *, device=None):
        from workbench.data.windows import iter_token_windows

        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        hook_point(model, cfg.hook_name)
        self.device = device or next(model.parameters()).device
        self._windows = iter_token_windows(tokenizer, _documents(cfg.sources, cfg.mix, cfg.seed), cfg.context_size)
        self._counter = itertools.count()
        self._held_out: list[list[int]] = []
        self._gen = torch.Generator().manual_seed(cfg.seed)
        self._buffer: torch.Tensor | None = None
        self.tokens_seen = 0  # activations served as training batches
        self.produced = 0  # activations computed (before outlier filtering)
        self.dropped = 0  # of which dropped as outliers
        self.exhausted = False

    def _next_windows(self, n: int) -> list[list[int]]:
        rows = []
        for w in self._windows:
            i = next(self._counter)
            if self.cfg.holdout_every and i % self.cfg.holdout_every == self.cfg.holdout_every - 1:
                self._held_out.append(w)
                continue
            rows.append(w)
            if len(rows) == n:
                break
        return rows

    def _produce(self, n_acts: int) -> torch.Tensor:
        chunks, have = [], 0
        while have < n_acts:
            rows = self._next_windows(self.cfg.windows_per_forward)
            if not rows:
                self.exhausted = True
                break
            acts = self._acts_of(rows)
            chunks.append(acts)
            have += acts.shape[0]
        if not chunks:
            raise RuntimeError(f"the corpus {self.cfg.sources} ran out of text")
        return torch.cat(chunks)

    def _acts_of(self, rows: list[list[int]]) -> torch.Tensor:
        """Training activations of token windows: first positions and outliers dropped, flattened."""
        ids = torch.tensor(rows, dtype=torch.long, device=self.device)
        acts = activations_at(self.model, ids, self.cfg.hook_name, autocast=self.cfg.autocast)[:, self.cfg.exclude_first:]
        return self._drop_outliers(acts.reshape(-1, acts.shape[-1]).float())

    def _add_to_buffer(self, acts: torch.Tensor | None = None) -> None:
        """Append ``acts`` (if any) to the buffer and reshuffle it."""
        buf = self._buffer if acts is None else acts if self._buffer is None else torch.cat([self._buffer, acts])
        self._buffer = buf[torch.randperm(buf.shape[0], generator=self._gen).to(buf.device)]

    def _drop_outliers(self, acts: torch.Tensor) -> torch.Tensor:
        self.produced += acts.shape[0]
        keep = inlier_mask(acts, self.cfg.outlier_ratio)
        self.dropped += int((~keep).sum())
        return acts[keep]

    def next_batch(self, peek: bool = False) -> torch.Tensor:
        """A ``[batch_size, d_in]`` float32 batch of shuffled activations."""
        cap, bs = self.cfg.batch_size * self.cfg.buffer_batches, self.cfg.batch_size
        if self._buffer is None or (self._buffer.shape[0] < cap // 2 and not self.exhausted):
            self._add_to_buffer(self._produce(cap - (0 if self._buffer is None else self._buffer.shape[0])))
        if self._buffer.shape[0] < bs:
            raise RuntimeError(f"the corpus {self.cfg.sources} ran out of text")
        batch = self._buffer[:bs]
        if not peek:
            self._buffer = self._buffer[bs:]
            self.tokens_seen += bs
        return batch

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next_batch()

    def eval_windows(self, n: int) -> torch.Tensor:
        """``[n, context_size]`` held-out token windows (never served as training activations)."""
        if not self.cfg.holdout_every:
            raise ValueError("holdout_every=0: this store keeps no evaluation windows")
        read = []  # the training windows read on the way are not lost: they join the buffer (one reshuffle)
        while len(self._held_out) < n:
            before = len(self._held_out)
            extra = self._next_windows(self.cfg.windows_per_forward)
            if not extra and len(self._held_out) == before:
                raise RuntimeError(f"only {before} held-out windows available, asked for {n}")
            if extra:
                read.append(self._acts_of(extra))
        if read:
            self._add_to_buffer(torch.cat(read))
        return torch.tensor(self._held_out[:n], dtype=torch.long)

    @torch.no_grad()
    def norm_scale(self, n_batches: int = 8) -> float:
        """Factor making the mean activation norm sqrt(d_in) (SAELens' ``expected_average_only_in``)."""
        norms = []
        for _ in range(n_batches):
            b = self.next_batch(peek=True)
            norms.append(b.norm(dim=-1).mean())
            self._add_to_buffer()
        return float(b.shape[-1] ** 0.5 / torch.stack(norms).mean())
