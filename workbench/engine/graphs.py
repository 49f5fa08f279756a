"""Decode steps recorded once and replayed: the engine's ``graphs`` option.

On a GPU a small model's decode step is bound by kernel launches: a few hundred small kernels, each launched
from Python. With ``graphs="cuda"`` one decode step of the ``hf`` backend (the model's forward on its
transformers ``StaticCache``) and the choice of the next token (argmax, or the fused Triton sampler of
:mod:`workbench.kernels.sampling`) are captured as a CUDA graph once per generate call, after the prefill, and
replayed for every further token: one launch per step. A replay reads and writes only fixed buffers: the
token ids, the whole-capacity attention mask, the positions, the sampler's step counter (read by the kernel
from device memory), the KV cache, whose fill count (where the next keys go) transformers keeps on the device
(``StaticLayer.cumulative_length``), and the outputs. The model's weights are read where they are, so
in-place weight edits made between steps are seen by the next replay.

``graphs="eager"`` runs the same step on the same buffers without capturing it, on any device: the code
path a graph records, for checking one against the other (the tests do so on CPU).

What a recorded step cannot hold is refused before anything runs, never run differently: interventions
(hooks and offsets run Python at every step), the processors that build tensors from Python values each step
(repetition, frequency and presence penalties, logit bias), the torch sampler (per-row generators; only the
Triton kernel draws inside a graph), logprobs, constrained decoding, strategies other than ``sample``, and
backends other than ``hf``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from workbench.engine.backends import HFBackend
from workbench.errors import UnknownNameError
from workbench.threads import num_threads

MODES = ("off", "cuda", "eager")
WARMUP_STEPS = 2  # eager runs on a side stream before capture: Triton compiles, cuBLAS picks its kernels


def check_mode(mode: str, device: torch.device) -> str:
    if mode not in MODES:
        raise UnknownNameError("decode graph mode", mode, MODES)
    if mode == "cuda" and device.type != "cuda":
        raise ValueError(f"graphs='cuda' records CUDA graphs; the model is on {device} (graphs='eager' runs the "
                         "same fixed-buffer step without capture)")
    return mode


def rows_refusal(params: Sequence, *, constrained: bool, logprobs: bool, kernel: bool) -> str | None:
    """Why a decode graph cannot run these rows (None: it can). ``params``: the rows' ``SamplingParams``;
    ``kernel``: whether the engine draws them with the fused Triton sampler."""
    if constrained:
        return "constrained decoding masks the logits with each row's automaton state (Python, every step)"
    if logprobs:
        return "logprobs are computed from the processed logits in torch after every step"
    if any(p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty or p.logit_bias
           for p in params):
        return "repetition, frequency and presence penalties and logit bias build their tensors every step"
    if not all(p.greedy for p in params) and not kernel:
        return ("sampled rows draw inside a graph with the fused Triton sampler only (sampler='triton', or 'auto' "
                "on CUDA, with filters the kernel implements: no typical-p, not top-k with top-p)")
    return None


class DecodeGraph:
    """One decode step of ``session``'s rows on fixed buffers, captured (``mode="cuda"``) or run as it is
    (``"eager"``); :meth:`step` advances the session by one token per row and returns the next tokens.

    ``sampler``: None (every row greedy: argmax) or the sampler's per-row parameters as keywords of
    :func:`workbench.kernels.sampling.prepare` (temperature, top_k, top_p, min_p, seeds).
    """

    def __init__(self, session, mode: str, sampler: dict | None = None):
        backend = session.backend
        if not isinstance(backend, HFBackend):
            raise ValueError(f"decode graphs record the 'hf' backend's static-cache step; this session runs on "
                             f"{backend.name!r} (pass backend='hf')")
        if session.applied:
            raise ValueError("decode graphs cannot replay interventions (hooks, offsets, adapters run Python at "
                             "every step); run with graphs='off'")
        self.session, self.mode, self.model = session, mode, backend.model
        self.cache_kwarg = backend.cache_kwarg
        B, dev = session.B, session.mask.device
        self.ids = torch.zeros((B, 1), dtype=torch.long, device=dev)
        self.mask = session.mask.clone()  # [B, capacity]: the whole cache, unfilled slots masked
        self.positions = torch.zeros((B, 1), dtype=torch.long, device=dev)
        self.offset = torch.zeros(1, dtype=torch.long, device=dev)  # the sampler's step counter
        self.tokens = torch.zeros(B, dtype=torch.long, device=dev)
        self.sampler = None
        if sampler is not None:
            from workbench.kernels import sampling as ksampling

            self.sampler = ksampling.prepare(session.logits.float(), **sampler)  # values checked here, once
        self._graph = None
        self._out: tuple[torch.Tensor, torch.Tensor] | None = None
        if mode == "cuda":
            self._capture()

    def _body(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The recorded step: forward one token per row, then choose the next (logits ``[B, V]``, tokens)."""
        out = self.model(input_ids=self.ids, attention_mask=self.mask, position_ids=self.positions,
                         use_cache=True, logits_to_keep=1,
                         **{self.cache_kwarg: self.session.cache.cache})
        logits = out.logits[:, -1].float()
        if self.sampler is None:
            torch.argmax(logits, dim=-1, out=self.tokens)
        else:
            from workbench.kernels import sampling as ksampling

            ksampling.launch(logits, *self.sampler, self.offset, self.tokens)
        return logits, self.tokens

    def _capture(self) -> None:
        s, dev = self.session, self.mask.device
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._body()
        torch.cuda.current_stream(dev).wait_stream(side)
        # the warm-up steps advanced the cache's fill counters; the keys they wrote sit in masked slots that the
        # real steps overwrite before they are unmasked
        s.backend.set_length(s.cache, s.filled)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._out = self._body()
        self._graph = graph

    def step(self, tokens: torch.Tensor, offset: int) -> torch.Tensor:
        """Feed ``tokens`` ``[B]`` (one per row) and return the next token of each row, drawn with step counter
        ``offset``; the session's ``logits`` become this step's."""
        s = self.session
        s._room(1)
        s.applied.refresh()
        if s.applied:
            raise ValueError("interventions became active during a graphed decode; run with graphs='off'")
        s.mask[:, s.filled] = 1
        self.ids.copy_(tokens.reshape(s.B, 1))
        self.mask.copy_(s.mask)
        self.positions.copy_(s.pos[:, None])
        self.offset.fill_(offset)
        if self._graph is not None:
            self._graph.replay()
            logits, out = self._out
        else:
            with num_threads(s._threads("decode")):
                logits, out = self._body()
        s.filled += 1
        s.pos += 1
        s.logits = logits
        return out.clone()
