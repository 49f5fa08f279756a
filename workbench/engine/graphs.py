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

What a recorded step cannot hold is refused before the prefill, never run differently: interventions
(hooks and offsets run Python at every step), the processors that build tensors from Python values each step
(repetition, frequency and presence penalties, logit bias), the torch sampler (per-row generators; only the
Triton kernel draws inside a graph), logprobs, constrained decoding, strategies other than ``sample``,
backends other than ``hf``, and models whose step keeps Python state or reads the device: sliding-window,
chunked or linear-attention layers (their cache layers count in Python), attention implementations other than
``sdpa`` and ``eager``, and dynamic or longrope RoPE. Torch hooks registered on the model in the middle of a
graphed call are not run by the replays (hooks are looked for before the prefill).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from workbench.engine.backends import STATIC_ROPE, HFBackend, rope_refusal
from workbench.errors import UnknownNameError
from workbench.threads import num_threads

MODES = ("off", "cuda", "eager")
ATTENTION = ("sdpa", "eager")  # attention implementations whose step reads nothing back to the host
# rope types whose HF forward reads no position back to the host (transformers updates dynamic and longrope
# frequencies from the positions, in Python)
GRAPH_ROPE = tuple(t for t in STATIC_ROPE if t != "longrope")
WARMUP_STEPS = 2  # eager steps before capture (on a side stream): Triton compiles, cuBLAS picks its kernels


def check_mode(mode: str, device: torch.device) -> str:
    if mode not in MODES:
        raise UnknownNameError("decode graph mode", mode, MODES)
    if mode == "cuda" and device.type != "cuda":
        raise ValueError(f"graphs='cuda' records CUDA graphs; the model is on {device} (graphs='eager' runs the "
                         "same fixed-buffer step without capture)")
    return mode


def model_refusal(model) -> str | None:
    """Why a decode graph cannot record this model's step (None: it can)."""
    cfg = model.config
    other = sorted({t for t in (getattr(cfg, "layer_types", None) or []) if t != "full_attention"})
    if other:
        return f"layers of type {other} keep Python state in their cache (only full-attention layers replay)"
    attn = getattr(cfg, "_attn_implementation", None) or "eager"
    if attn not in ATTENTION:
        return f"attention implementation {attn!r} (recorded: {', '.join(ATTENTION)})"
    for module in model.modules():  # every rotary embedding, whatever the family (the hf backend runs any)
        if hasattr(module, "rope_type"):
            why = rope_refusal(module, GRAPH_ROPE)
            if why:
                return why
    return None


def interventions_refusal(engine) -> str | None:
    """Why the interventions in force around ``engine`` now cannot be replayed (None: there are none)."""
    from workbench.interp.hooks import active_hooks, foreign_hooks

    iv = engine.interventions
    if iv.offsets or iv.hooks or iv.adapters is not None:
        return "interventions from Engine.intervene (offsets, hooks, adapters) run Python at every step"
    active = active_hooks(engine.model)
    if active:
        return "workbench.interp.Hooks contexts are installed on the model"
    foreign = foreign_hooks(engine.model, active)
    if foreign:
        return f"torch hooks are registered on {foreign[:3]}"
    return None


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
        from transformers.cache_utils import StaticLayer

        backend = session.backend
        if not isinstance(backend, HFBackend):
            raise ValueError(f"decode graphs record the 'hf' backend's static-cache step; this session runs on "
                             f"{backend.name!r} (pass backend='hf')")
        if session.applied:
            raise ValueError("decode graphs cannot replay interventions (hooks, offsets, adapters run Python at "
                             "every step); run with graphs='off'")
        odd = sorted({type(ly).__name__ for ly in session.cache.cache.layers if type(ly) is not StaticLayer})
        if odd:
            raise ValueError(f"decode graphs replay full-attention StaticLayer caches only; this cache has {odd}")
        self.session, self.mode, self.model = session, mode, backend.model
        self.cache_kwarg = backend.cache_kwarg
        B, dev = session.B, session.mask.device
        self.device = dev
        self.ids = torch.zeros((B, 1), dtype=torch.long, device=dev)
        self.mask = session.mask.clone()  # [B, capacity]: the whole cache, unfilled slots masked
        self.positions = session.pos[:, None].clone()
        self.offset = torch.zeros(1, dtype=torch.long, device=dev)  # the sampler's step counter
        self.tokens = torch.zeros(B, dtype=torch.long, device=dev)
        self.sampler = None
        if sampler is not None:
            from workbench.kernels import sampling as ksampling

            self.sampler = ksampling.prepare(session.logits.float(), **sampler)  # values checked here, once
        self._graph = None
        self._out: tuple[torch.Tensor, torch.Tensor] | None = None
        if session.filled >= session.capacity:
            raise ValueError(f"session full: no slot left for a decode step ({session.capacity} slots)")
        if mode == "cuda":
            with torch.cuda.device(dev):
                self._capture()
        else:
            self._warm_up()

    def _body(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The recorded step: forward one token per row, then choose the next (logits ``[B, V]``, tokens)."""
        out = self.model(input_ids=self.ids, attention_mask=self.mask, position_ids=self.positions,
                         use_cache=True, logits_to_keep=1, **{self.cache_kwarg: self.session.cache.cache})
        logits = out.logits[:, -1].float()
        if self.sampler is None:
            torch.argmax(logits, dim=-1, out=self.tokens)
        else:
            from workbench.kernels import sampling as ksampling

            ksampling.launch(logits, *self.sampler, self.offset, self.tokens)
        return logits, self.tokens

    def _warm_up(self) -> None:
        """A few steps on the current buffers, each from the same cache fill count, which is then put back:
        they write only the next slot, still masked, which the first real step overwrites."""
        s = self.session
        for _ in range(WARMUP_STEPS):
            s.backend.set_length(s.cache, s.filled)
            self._body()
        s.backend.set_length(s.cache, s.filled)

    def _capture(self) -> None:
        dev = self.device
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            self._warm_up()
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # recording launches no kernel: the fill counters stay where the warm-up left them
        with torch.cuda.graph(graph, stream=torch.cuda.Stream(device=dev), capture_error_mode="thread_local"):
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
            with torch.cuda.device(self.device):
                self._graph.replay()
            logits, out = self._out
        else:
            with num_threads(s._threads("decode")):
                logits, out = self._body()
        s.cache.length += 1
        s.filled += 1
        s.pos += 1
        s.logits = logits.clone()  # the graph's buffer is rewritten by the next replay
        return out.clone()
