"""Prefill + decode loop over an HF causal LM with a preallocated (static) KV cache.

Batches of prompts with different lengths are left-padded; positions come from the attention mask,
so every row sees the same positions as it would alone. Each request has its own stop conditions
(EOS, stop strings, max tokens), its own random generator and optionally a regex / JSON-schema constraint.
Other decoding strategies (beam search, ...) are registered in :mod:`workbench.engine.strategies` and reach
the model through the same backend (:mod:`workbench.engine.backends`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from workbench.engine import processors, sampling
from workbench.engine.backends import HFBackend, PackedLlamaBackend, make_backend
from workbench.engine.config import GenerationConfig
from workbench.engine.interventions import NONE, Applied, Interventions
from workbench.engine.results import GenerationResult, TokenEvent, TokenLogprob, token_logprobs
from workbench.engine.step import Session
from workbench.engine.stopping import Stopper
from workbench.engine.strategies import get_strategy
from workbench.threads import DEFAULT_POLICY, ThreadPolicy, resolve

GENERATION_DEFAULT = GenerationConfig()
__all__ = ["Engine", "GenerationResult", "TokenEvent", "TokenLogprob"]


@dataclass
class _Row:
    cfg: GenerationConfig
    generator: torch.Generator
    stop: Stopper

    @property
    def guide(self):  # constrained.RowGuide or None
        return self.stop.guide

    @property
    def result(self) -> GenerationResult:
        return self.stop.result

    @property
    def done(self) -> bool:
        return self.stop.done


class Engine:
    """Token-level generation over a loaded model; see :meth:`generate` and :meth:`stream`.

    ``backend``: ``"auto"`` (lean packed forward for Llama-layout models, else the model's own forward; per
    request, the model's own forward whenever an intervention needs it), ``"hf"``, ``"packed-llama"``, or a
    backend instance built for this model; ``threads``: CPU thread counts for prefill and decode (default:
    the machine's physical cores; None: leave torch's);
    ``sampler``: ``"auto"`` (the fused Triton sampling kernel on CUDA when the rows' filters allow it, else
    torch), ``"torch"`` or ``"triton"`` (on CPU this needs ``TRITON_INTERPRET=1``). The kernel draws from the
    same distribution with its own random stream (seeded per request, so still reproducible).

    Interventions (residual offsets, hooks, LoRA adapters per request) go through :meth:`intervene`; hooks
    installed around a call with ``workbench.interp.Hooks`` are honoured too (see
    :mod:`workbench.engine.interventions`). ``adapters``: the :class:`workbench.lora.AdapterRegistry` that adapter
    names are looked up in. ``weights``: the packed backend's weight format (``fp32``, ``bf16``, ``fp16``, ``int8``, ``q4``;
    see :mod:`workbench.engine.weights`): a copy the decode matmuls stream, the model's parameters untouched;
    greedy output equals HF's only in fp32. ``gguf``: with ``weights="q4"``, a GGUF file whose Q4_1 blocks are
    used as they are wherever they still equal the model's weights. ``activations="q8"`` (with ``int8`` or ``q4``
    weights): decode matmuls quantize their inputs to int8 blocks and use integer dot products (as llama.cpp);
    ``activations="bf16"`` (with ``bf16`` weights): they round their inputs to bfloat16 (bfloat16 dot products).
    ``prefill``: the packed backend's prefill GEMM, ``"aten"`` (the fp32 default: HF's bits) or ``"onednn"`` (the
    other formats' default; faster, not bitwise HF's, one more float32 copy of the layers).
    ``graphs``: ``"off"``, ``"cuda"`` (each generate call's decode steps, the next-token choice included, are
    captured once as a CUDA graph and replayed; the ``hf`` backend on CUDA, sampling strategy only) or
    ``"eager"`` (the same fixed-buffer step without capture); see :mod:`workbench.engine.graphs`.
    """

    SAMPLERS = ("auto", "torch", "triton")

    def __init__(self, model, tokenizer, *, threads: ThreadPolicy | None = DEFAULT_POLICY, backend: str = "auto",
                 sampler: str = "auto", prefill_chunk: int = 2048, adapters=None, weights: str = "fp32",
                 gguf=None, activations: str = "fp32", graphs: str = "off", prefill: str | None = None):
        if not hasattr(model, "config") or not callable(model):
            raise TypeError("Engine needs a Hugging Face causal LM (a module with .config)")
        self.model = model
        self.tokenizer = tokenizer
        self.threads = resolve(threads)
        self.device = next(model.parameters()).device
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = 0 if pad is None else pad
        self.weights, self.gguf, self.activations, self.prefill = weights, gguf, activations, prefill
        self.backend = make_backend(model, backend, weights, gguf, activations, prefill)
        self._auto_backend = isinstance(backend, str) and backend == "auto"
        self._backends = {self.backend.name: self.backend}  # auto: one instance per name (no re-pack per switch)
        if sampler not in self.SAMPLERS:
            raise ValueError(f"sampler must be one of {self.SAMPLERS}, got {sampler!r}")
        self.sampler = sampler
        from workbench.engine.graphs import check_mode, model_refusal

        self.graphs = check_mode(graphs, self.device)
        if graphs != "off" and not isinstance(self.backend, HFBackend):
            raise ValueError(f"graphs={graphs!r} records the 'hf' backend's static-cache step; backend "
                             f"{self.backend.name!r} was chosen (pass backend='hf')")
        why = model_refusal(model) if graphs != "off" else None
        if why:
            raise ValueError(f"graphs={graphs!r} cannot record this model's decode step: {why}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk  # long prompts go through in pieces: attention memory stays O(chunk * L)
        self._compiler = None
        if adapters is not None and getattr(adapters, "model", None) is not model:
            raise ValueError("the adapter registry was built for another model")
        self.adapters = adapters
        self._interventions: list[Interventions] = []
        self._siblings: dict[tuple[int, int], Engine] = {}

    def sibling(self, model, tokenizer) -> Engine:
        """An engine for another model with this one's thread policy and sampler (e.g. a draft model), built
        once per model and reused."""
        key = (id(model), id(tokenizer))
        if key not in self._siblings:
            self._siblings[key] = type(self)(model, tokenizer, threads=self.threads, sampler=self.sampler)
        return self._siblings[key]

    # -- interventions ------------------------------------------------------------------------------

    @contextmanager
    def intervene(self, interventions: Interventions | None = None, *, offsets=None, hooks=(), adapters=None):
        """Apply residual ``offsets``, ``hooks`` and LoRA ``adapters`` (one name, or one name or None per
        request; or an :class:`Interventions`) to every generation inside the block, whatever the strategy;
        nested blocks add up. Removed on exit, even on error::

            with engine.intervene(offsets={"blocks.10.hook_resid_post": vec}):
                engine.generate(prompts, cfg)
        """
        if interventions is not None and (offsets or hooks or adapters is not None):
            raise ValueError("intervene takes an Interventions or offsets=/hooks=/adapters=, not both")
        iv = interventions if interventions is not None else Interventions(dict(offsets or {}), tuple(hooks),
                                                                            adapters)
        if not isinstance(iv, Interventions):
            raise TypeError(f"intervene takes an Interventions, got {type(iv).__name__}")
        self._interventions.append(iv)
        try:
            yield iv
        finally:
            # by identity: equal-valued blocks may nest (and tensors do not compare to a bool)
            del self._interventions[next(i for i, x in enumerate(self._interventions) if x is iv)]

    @property
    def interventions(self) -> Interventions:
        """The interventions in force now (all open :meth:`intervene` blocks merged)."""
        out = NONE
        for iv in self._interventions:
            out = out.merged(iv)
        return out

    def _choose_backend(self, applied: Applied, length: int):
        """The backend that runs ``applied`` over ``length`` cache slots exactly: auto switches, an explicit
        backend raises."""
        if self._auto_backend:
            want = "packed-llama"
            if PackedLlamaBackend.unsupported(self.model) is not None:
                want = "hf"  # the model may have changed since (e.g. a dynamic RoPE scaling hook)
            else:
                packed = self._backend_named(want)
                limit = packed.max_cache_len()
                if packed.unsupported_interventions(applied) is not None or (limit is not None and length > limit):
                    want = "hf"
            if want == "hf" and self.weights != "fp32":
                why = (PackedLlamaBackend.unsupported(self.model)
                       or self._backend_named("packed-llama").unsupported_interventions(applied)
                       or f"{length} cache slots exceed the packed backend's limit")
                raise ValueError(f"weights={self.weights!r} runs on the packed backend only, and this request needs "
                                 f"the model's own forward: {why}")
            self.backend = self._backend_named(want)
            return self.backend
        why = self.backend.unsupported_interventions(applied)
        if why:
            raise ValueError(f"backend {self.backend.name!r} cannot honour the interventions in force: {why}; "
                             "use backend='hf' or 'auto'")
        return self.backend

    def _backend_named(self, name: str):
        if name not in self._backends:
            self._backends[name] = make_backend(self.model, name, self.weights, self.gguf, self.activations,
                                                self.prefill if name == "packed-llama" else None)
        return self._backends[name]

    # -- the step API -------------------------------------------------------------------------------

    def start(self, prompts: Sequence[Sequence[int]], extra: int, *, requests: Sequence[int] | None = None,
              n_requests: int | None = None, adapters: Sequence[str | None] | None = None) -> Session:
        """Prefill token-id ``prompts`` (one cache row each) with room for ``extra`` more slots per row.

        ``requests[r]``: the request row ``r`` serves (default: its own index), for per-request offsets and
        adapters; ``n_requests``: how many requests there are (default: ``len(prompts)``); ``adapters``: a LoRA
        adapter name (or None) per request, when no :meth:`intervene` block chooses them.
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("start needs at least one non-empty prompt")
        req = torch.as_tensor(list(range(len(prompts))) if requests is None else list(requests), device=self.device)
        n = len(prompts) if n_requests is None else n_requests
        iv = self.interventions if adapters is None else self.interventions.with_adapters(adapters)
        applied = Applied(self.model, iv, req, n, self.adapters)
        try:
            backend = self._choose_backend(applied, max(len(p) for p in prompts) + extra)
            return Session(self, backend, applied, prompts, extra, req)
        except BaseException:
            if applied.lora is not None:  # not left pinned by a traceback that holds the Applied
                applied.lora.release()
            raise

    @torch.inference_mode()
    def teacher_forced(self, prompt: Sequence[int], continuation: Sequence[int]) -> torch.Tensor:
        """Next-token logits ``[len(continuation), V]`` along ``continuation`` after ``prompt`` (row ``t``
        predicts ``continuation[t]``), under the interventions in force: a prefill, then one step."""
        if not continuation:
            raise ValueError("teacher_forced needs a non-empty continuation")
        s = self.start([list(prompt)], len(continuation))
        if len(continuation) == 1:
            return s.logits[0][None]
        return torch.cat([s.logits[0][None], s.step([list(continuation[:-1])])[0, : len(continuation) - 1]])

    # -- inputs -------------------------------------------------------------------------------------

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("empty prompt")
            ids = self.tokenizer(prompt)["input_ids"]
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("empty prompt: a request needs at least one token")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        return ids

    def encode_all(self, prompts) -> list[list[int]]:
        """Encode a non-empty list of prompts (strings or token-id lists)."""
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
            raise ValueError("prompts must be a non-empty list of strings or token-id lists")
        return [self.encode(p) for p in prompts]

    def default_eos(self) -> frozenset[int]:
        ids = self.model.generation_config.eos_token_id if hasattr(self.model, "generation_config") else None
        if ids is None:
            ids = self.tokenizer.eos_token_id
        if ids is None:
            return frozenset()
        return frozenset([ids] if isinstance(ids, int) else ids)

    def stop_ids(self, eos_token_ids, ignore_eos: bool = False) -> frozenset[int]:
        """A request's EOS set: none if ignored, its own ids if given, else the model's / tokenizer's."""
        if ignore_eos:
            return frozenset()
        return frozenset(eos_token_ids) if eos_token_ids is not None else self.default_eos()

    def stopper(self, prompt_ids: list[int], max_new_tokens: int, *, eos_token_ids=None, ignore_eos=False,
                stop_strings: Sequence[str] = (), guide=None, stream: bool = False,
                logprobs: int | None = None) -> Stopper:
        """A request's stop state (EOS, token budget, stop strings) around a fresh result (collecting logprobs
        when ``logprobs`` is not None)."""
        eos = self.stop_ids(eos_token_ids, ignore_eos)
        if guide is not None:
            eos = eos | {guide.eos_token_id}  # the automaton ends a match with the tokenizer's EOS
        return Stopper(self.tokenizer, GenerationResult(prompt_ids), eos, max_new_tokens, stop_strings, guide,
                       want_text=stream, logprobs=logprobs is not None)

    def generator(self, seed: int | None) -> torch.Generator:
        """A request's own random generator (seeded, or from torch's global RNG when ``seed`` is None)."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
        return gen

    def guide(self, constraint):
        """A fresh automaton position for ``constraint`` (compiled once per pattern and tokenizer)."""
        from workbench.engine.constrained import Compiler

        if self._compiler is None:
            self._compiler = Compiler(self.tokenizer, self.tokenizer.eos_token_id, self.vocab_size)
        return self._compiler.guide(constraint)

    def _rows(self, prompts, configs, stream: bool) -> list[_Row]:
        ids = self.encode_all(prompts)
        if isinstance(configs, GenerationConfig):
            configs = [configs] * len(ids)
        if len(configs) != len(ids):
            raise ValueError(f"{len(configs)} configs for {len(ids)} prompts")
        rows = []
        for p, cfg in zip(ids, configs, strict=True):
            if not isinstance(cfg, GenerationConfig):
                raise TypeError(f"config must be a GenerationConfig, got {type(cfg).__name__}")
            guide = self.guide(cfg.constraint) if cfg.constraint is not None else None
            stop = self.stopper(p, cfg.max_new_tokens, eos_token_ids=cfg.eos_token_ids, ignore_eos=cfg.ignore_eos,
                                stop_strings=cfg.stop_strings, guide=guide, stream=stream, logprobs=cfg.logprobs)
            rows.append(_Row(cfg, self.generator(cfg.seed), stop))
        if self.graphs != "off":  # refused before the prefill
            from workbench.engine.graphs import interventions_refusal, model_refusal, rows_refusal

            params = [r.cfg.sampling for r in rows]
            why = (rows_refusal(params, constrained=any(r.guide is not None for r in rows),
                                logprobs=any(r.cfg.logprobs is not None for r in rows),
                                kernel=self._use_kernel(params))
                   or interventions_refusal(self) or model_refusal(self.model))
            if why:
                raise ValueError(f"graphs={self.graphs!r} cannot run these requests: {why}")
        return rows

    # -- entry points -------------------------------------------------------------------------------

    def stream(self, prompts, config: GenerationConfig | Sequence[GenerationConfig] = GENERATION_DEFAULT
               ) -> Iterator[TokenEvent]:
        """Yield :class:`TokenEvent` s as tokens are chosen (rows interleaved, in request order per step)."""
        rows = self._rows(prompts, config, stream=True)
        # prefill now, so the interventions in force at this call are the ones the stream runs with
        return self._run(rows, stream=True, session=self._start_rows(rows))

    def generate(self, prompts, config=None, *, strategy: str = "sample") -> list[GenerationResult]:
        """Run ``strategy`` (an exact name from :data:`workbench.engine.strategies.STRATEGIES`) and return one
        :class:`GenerationResult` per prompt.

        ``"sample"`` (default; greedy when ``temperature == 0``) takes a :class:`GenerationConfig` or one per
        prompt; ``"beam"`` a ``BeamConfig``; ``"speculative"`` a ``SpeculativeConfig``; ``"mcts"`` an
        ``MCTSConfig``.
        """
        strat = get_strategy(strategy)
        if self.graphs != "off" and strategy != "sample":
            raise ValueError(f"graphs={self.graphs!r} records the sampling strategy's decode step; strategy "
                             f"{strategy!r} runs its own steps (use an engine with graphs='off')")
        if config is not None:
            ok = (isinstance(config, strat.config_type) or (
                isinstance(config, Sequence) and config and all(isinstance(c, strat.config_type) for c in config)
                and getattr(strat, "per_prompt_configs", False)))
            if not ok:
                raise TypeError(f"strategy {strategy!r} takes a {strat.config_type.__name__}, got "
                                f"{type(config).__name__}")
        return strat.generate(self, prompts, config)

    def sample(self, prompts, config: GenerationConfig | Sequence[GenerationConfig] = GENERATION_DEFAULT
               ) -> list[GenerationResult]:
        rows = self._rows(prompts, config, stream=False)
        for _ in self._run(rows, stream=False, session=self._start_rows(rows)):
            pass
        return [r.result for r in rows]

    def _start_rows(self, rows: list[_Row]) -> Session:
        with torch.inference_mode():
            return self.start([r.result.prompt_ids for r in rows], max(r.cfg.max_new_tokens for r in rows))

    # -- main loop ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def _run(self, rows: list[_Row], stream: bool, session: Session) -> Iterator[TokenEvent]:
        B, dev = len(rows), self.device
        steps = max(r.cfg.max_new_tokens for r in rows)
        logits = session.logits
        seen = torch.zeros((B, self.vocab_size), dtype=torch.bool, device=dev)
        counts = torch.zeros((B, self.vocab_size), dtype=torch.int32, device=dev)
        for i, r in enumerate(rows):
            seen[i, torch.tensor(r.result.prompt_ids, device=dev)] = True
        params = [r.cfg.sampling for r in rows]
        greedy = [p.greedy for p in params]
        gens = [r.generator for r in rows]
        constrained = [i for i, r in enumerate(rows) if r.guide is not None]
        want_lp = [r.cfg.logprobs for r in rows]
        any_lp = any(k is not None for k in want_lp)
        fused = self._use_kernel(params) and not any_lp  # logprobs need the processed logits in torch
        if fused:
            from workbench.kernels import sampling as ksampling

            kw = dict(temperature=[p.temperature for p in params], top_k=[p.top_k for p in params],
                      top_p=[p.top_p for p in params], min_p=[p.min_p for p in params],
                      seeds=[int(torch.randint(0, 2**62, (), generator=g, device=g.device)) for g in gens])

        graph = None  # built at the first decode step (none when every row stops at its first token)
        drawn = None  # the next tokens, when the graph's step already chose them
        with session.decoding():
            for t in range(steps):
                if drawn is not None:
                    tokens = drawn
                else:
                    if constrained:
                        allowed = torch.ones_like(seen)
                        for i in constrained:
                            allowed[i] = rows[i].guide.allowed().to(dev)
                        logits = logits.masked_fill(~allowed, float("-inf"))
                    if fused:
                        x = processors.process(logits, params, seen, counts, filters=False)
                        tokens = ksampling.sample(x, **kw, offset=t, impl="triton")
                    else:
                        x = processors.process(logits, params, seen, counts)
                        tokens = sampling.choose(x, greedy, gens)
                live = torch.tensor([i for i, r in enumerate(rows) if not r.done], device=dev)
                seen[live, tokens[live]] = True
                counts[live, tokens[live]] += 1
                token_list = tokens.tolist()
                lps = token_logprobs(torch.log_softmax(x.float(), -1), token_list, want_lp) if any_lp else [None] * B
                for i in live.tolist():
                    r = rows[i]
                    delta, kept = r.stop.push(token_list[i], lps[i])
                    lp = lps[i] if kept else None
                    if stream:
                        yield TokenEvent(i, token_list[i], delta, r.done, r.result.finish_reason, lp)
                if all(r.done for r in rows):
                    return
                if self.graphs != "off":
                    if graph is None:
                        from workbench.engine.graphs import DecodeGraph

                        graph = DecodeGraph(session, self.graphs, None if all(greedy) else dict(kw))
                    drawn = graph.step(tokens, offset=t + 1)
                else:
                    logits = session.decode(tokens)

    def _use_kernel(self, params) -> bool:
        if self.sampler == "torch" or all(p.greedy for p in params):
            return False
        ok = processors.fused_kernel_can_sample(params)
        if self.sampler == "triton":
            if not ok:
                raise ValueError("the Triton sampler cannot combine top-k with top-p, nor do typical-p; "
                                 "use sampler='torch' or 'auto'")
            return True
        from workbench.kernels._launch import triton_importable

        return ok and self.device.type == "cuda" and triton_importable()
