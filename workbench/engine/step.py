"""The step API: one batch of rows in a backend's KV cache, driven token by token.

Every strategy (sampling, beam search, speculative decoding, MCTS) runs on a :class:`Session`:

- :meth:`Engine.start <workbench.engine.Engine.start>` left-pads the prompts and prefills them; ``logits``
  holds each row's next-token logits;
- :meth:`Session.decode` feeds one token per row, :meth:`Session.step` any number per row (ragged rows are
  padded with masked slots);
- :meth:`Session.rollback` forgets a row's last tokens (rejected drafts), :meth:`Session.truncate` every slot
  from a point on (prefix reuse), :meth:`Session.reorder` keeps or repeats rows (beams).

Positions come from the mask (a row's next position is its number of valid tokens), so a row sees the same
positions as it would alone, whatever the padding and rollbacks. The engine's interventions are resolved at
the prefill and follow the rows through reorders; ``Hooks`` contexts are looked up again before every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch

from workbench.threads import num_threads


class Session:
    """Rows in one KV cache (see module docstring). Build with ``engine.start(prompts, extra)``."""

    def __init__(self, engine, backend, applied, prompts: Sequence[Sequence[int]], extra: int,
                 requests: torch.Tensor):
        if extra < 0:
            raise ValueError(f"extra must be >= 0, got {extra}")
        self.engine, self.backend, self.applied = engine, backend, applied
        self.requests = requests  # [B]: the request (prompt of the generate call) each row serves
        B, L = len(prompts), max(len(p) for p in prompts)
        dev = engine.device
        ids = torch.full((B, L), engine.pad_id, dtype=torch.long, device=dev)
        self.mask = torch.zeros((B, L + extra), dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):
            ids[i, L - len(p):] = torch.tensor(p, device=dev)
            self.mask[i, L - len(p): L] = 1
        positions = (self.mask[:, :L].cumsum(-1) - 1).clamp(min=0)
        self.cache = backend.new_cache(B, L + extra)
        self.B, self.capacity = B, L + extra
        with num_threads(self._threads("prefill")):
            for s in range(0, L, engine.prefill_chunk):
                e = min(L, s + engine.prefill_chunk)
                logits = backend.forward(ids[:, s:e], self.mask[:, :e], positions[:, s:e], self.cache,
                                         applied=applied)
        self.logits = logits  # [B, V]: next-token logits after the prompt (then after each decode)
        self.filled = L  # slots used (valid or masked)
        self.pos = positions[:, -1] + 1  # [B] next position per row

    def _threads(self, phase: str) -> int | None:
        policy = self.engine.threads
        return getattr(policy, phase) if policy else None

    @contextmanager
    def decoding(self):
        """Hold the decode thread count over a loop of steps (each step also sets it)."""
        with num_threads(self._threads("decode")):
            yield

    def _forward(self, ids, positions, all_positions):
        self.applied.refresh()
        with num_threads(self._threads("decode")):
            return self.backend.forward(ids, self.mask[:, : self.filled + ids.shape[1]], positions, self.cache,
                                        all_positions=all_positions, applied=self.applied)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (``[B]``); returns the next logits ``[B, V]``."""
        self._room(1)
        self.mask[:, self.filled] = 1
        logits = self._forward(tokens.reshape(self.B, 1), self.pos[:, None], False)
        self.filled += 1
        self.pos += 1
        self.logits = logits
        return logits

    def step(self, tokens: Sequence[Sequence[int]]) -> torch.Tensor:
        """Feed each row its own tokens (counts may differ, a row may get none); returns ``[B, U, V]`` logits
        for every fed slot, ``U`` = the most tokens any row got (at least 1)."""
        if len(tokens) != self.B:
            raise ValueError(f"{len(tokens)} token lists for {self.B} rows")
        dev = self.engine.device
        U = max(1, max(len(t) for t in tokens))
        self._room(U)
        ids = torch.full((self.B, U), self.engine.pad_id, dtype=torch.long, device=dev)
        lens = torch.tensor([len(t) for t in tokens], device=dev)
        for b, t in enumerate(tokens):
            if len(t):
                ids[b, : len(t)] = torch.as_tensor(t, device=dev)
        j = torch.arange(U, device=dev)
        self.mask[:, self.filled: self.filled + U] = (j[None, :] < lens[:, None]).long()
        logits = self._forward(ids, self.pos[:, None] + j[None, :], True)
        self.filled += U
        self.pos += lens
        return logits

    def _room(self, n: int) -> None:
        if self.filled + n > self.capacity:
            raise ValueError(f"session full: {self.filled} + {n} slots > capacity {self.capacity}")

    @property
    def rollback_refusal(self) -> str | None:
        """Why :meth:`rollback` / :meth:`truncate` would not be exact on this cache (None: they are)."""
        return self.backend.inexact_rollback(self.cache)

    def rollback(self, row: int, n: int) -> None:
        """Forget the last ``n`` tokens fed to ``row`` (their slots are masked; positions are reused)."""
        if n <= 0:
            return
        why = self.rollback_refusal
        if why:
            raise ValueError(f"cannot roll back on this cache: {why}")
        valid = self.mask[row, : self.filled].nonzero().flatten()
        if n > len(valid):
            raise ValueError(f"row {row} has {len(valid)} tokens, cannot roll back {n}")
        self.mask[row, valid[-n:]] = 0
        self.pos[row] -= n

    def truncate(self, slots: int) -> None:
        """Forget every slot from ``slots`` on, for all rows; the next tokens overwrite them."""
        if not 0 < slots <= self.filled:
            raise ValueError(f"truncate needs 0 < slots <= {self.filled}, got {slots}")
        why = self.rollback_refusal
        if why:
            raise ValueError(f"cannot truncate this cache: {why}")
        self.backend.truncate(self.cache, slots)
        self.mask[:, slots:] = 0
        self.filled = slots
        self.pos = self.mask[:, :slots].sum(-1)

    def reorder(self, index: torch.Tensor) -> None:
        """Row ``r`` becomes old row ``index[r]`` (beam search: keep, drop and repeat rows)."""
        index = index.to(self.mask.device)
        if index.shape != (self.B,):
            raise ValueError(f"reorder needs {self.B} row indices, got shape {tuple(index.shape)}")
        self.backend.reorder(self.cache, index)
        self.mask = self.mask.index_select(0, index)
        self.pos = self.pos.index_select(0, index)
        self.requests = self.requests.index_select(0, index)
        self.applied.select(self.requests)
        self.applied.reindex(index)

    @torch.no_grad()
    def regroup(self, keep: Sequence[int], joining: Session | None = None, extra: int = 0) -> None:
        """Rebuild the batch from old rows ``keep`` followed by every row of ``joining`` (a session started on
        the same engine, backend and interventions, its rows' LoRA adapters aside), with room for ``extra`` more
        slots per row.

        Each row's valid slots are packed to the right end of the new cache (its keys already carry their
        positions, and attention goes by the mask), so a row sees exactly the keys and positions it saw before:
        its next tokens are the ones it would get alone. ``logits`` are those of the kept and joined rows.
        """
        parts = [(self, int(r)) for r in keep]
        if joining is not None:
            if joining.backend is not self.backend:
                raise ValueError("the joining session runs on another backend")
            why = self.applied.can_join(joining.applied)
            if why:
                raise ValueError(f"cannot regroup: {why}")
            parts += [(joining, r) for r in range(joining.B)]
        if not parts:
            raise ValueError("regroup needs at least one row")
        if extra < 0:
            raise ValueError(f"extra must be >= 0, got {extra}")
        why = self.rollback_refusal or (joining.rollback_refusal if joining is not None else None)
        if why:
            raise ValueError(f"cannot regroup this cache: {why}")
        slots = [src.mask[r, : src.filled].nonzero().flatten() for src, r in parts]
        L = max(len(s) for s in slots)
        B, cap, dev = len(parts), L + extra, self.mask.device
        cache = self.backend.empty_like(self.cache, B, cap)
        dst = self.backend.kv(cache)
        mask = torch.zeros((B, cap), dtype=torch.long, device=dev)
        for src in {id(s): s for s, _ in parts}.values():
            # one gather per layer and source: dest rows `bs` take source rows `rs` at slots `idx`
            bs = [b for b, (s, _) in enumerate(parts) if s is src]
            rs = torch.tensor([parts[b][1] for b in bs], device=dev)
            idx = torch.zeros((len(bs), L), dtype=torch.long, device=dev)  # slot 0 fills masked places
            for i, b in enumerate(bs):
                n = len(slots[b])
                idx[i, L - n:] = slots[b]
                mask[b, L - n: L] = 1
            bs_t = torch.tensor(bs, device=dev)
            for (sk, sv), (dk, dv) in zip(self.backend.kv(src.cache), dst, strict=True):
                dk[bs_t, :, :L] = sk[rs[:, None], :, idx].transpose(1, 2)  # [m, L, H, D] -> [m, H, L, D]
                dv[bs_t, :, :L] = sv[rs[:, None], :, idx].transpose(1, 2)
        self.backend.set_length(cache, L)
        rows = [(src, torch.tensor([r], device=dev)) for src, r in parts]
        self.logits = torch.cat([src.logits.index_select(0, r) for src, r in rows])
        self.pos = torch.cat([src.pos.index_select(0, r) for src, r in rows])
        self.requests = torch.cat([src.requests.index_select(0, r) for src, r in rows])
        self.applied.joined_rows([(src.applied, r) for src, r in rows])
        self.cache, self.mask, self.B, self.capacity, self.filled = cache, mask, B, cap, L
        self.applied.select(self.requests)
