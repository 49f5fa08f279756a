"""Prefill + decode loop over an HF causal LM with a preallocated (static) KV cache.

Batches of prompts with different lengths are left-padded; positions come from the attention mask,
so every row sees the same positions as it would alone. Each request has its own stop conditions
(EOS, stop strings, max tokens), its own random generator and optionally a regex / JSON-schema constraint.
Other decoding strategies (beam search, ...) are registered in :mod:`workbench.engine.strategies` and reach
the model through the same backend (:mod:`workbench.engine.backends`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from workbench.engine import processors, sampling
from workbench.engine.backends import make_backend
from workbench.engine.config import GenerationConfig
from workbench.threads import DEFAULT_POLICY, ThreadPolicy, num_threads

GENERATION_DEFAULT = GenerationConfig()


@dataclass(frozen=True)
class TokenEvent:
    """One streamed step of one request: the token, the text it completed (may be empty), and whether it ended."""

    index: int
    token_id: int
    text: str
    finished: bool
    finish_reason: str | None  # "eos" | "stop" | "length" once finished


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None


@dataclass
class _Row:
    cfg: GenerationConfig
    eos: frozenset[int]
    generator: torch.Generator
    result: GenerationResult
    guide: object | None = None  # constrained.RowGuide
    text: str = ""  # text decoded so far
    emitted: int = 0  # characters of it already streamed
    prefix: int = 0  # incremental detokenisation window: token offsets
    read: int = 0
    done: bool = False


class Engine:
    """Token-level generation over a loaded model; see :meth:`generate` and :meth:`stream`.

    ``backend``: ``"auto"`` (lean packed forward for Llama-family models, else the model's own forward),
    ``"hf"``, ``"packed-llama"``, or a backend instance built for this model; ``threads``: CPU thread counts for prefill and decode (None: leave torch's);
    ``sampler``: ``"auto"`` (the fused Triton sampling kernel on CUDA when the rows' filters allow it, else
    torch), ``"torch"`` or ``"triton"`` (on CPU this needs ``TRITON_INTERPRET=1``). The kernel draws from the
    same distribution with its own random stream (seeded per request, so still reproducible).
    """

    SAMPLERS = ("auto", "torch", "triton")

    def __init__(self, model, tokenizer, *, threads: ThreadPolicy | None = DEFAULT_POLICY, backend: str = "auto",
                 sampler: str = "auto", prefill_chunk: int = 2048):
        if not hasattr(model, "config") or not callable(model):
            raise TypeError("Engine needs a Hugging Face causal LM (a module with .config)")
        self.model = model
        self.tokenizer = tokenizer
        self.threads = threads
        self.device = next(model.parameters()).device
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = 0 if pad is None else pad
        self.backend = make_backend(model, backend)
        self._auto_backend = isinstance(backend, str) and backend == "auto"
        if sampler not in self.SAMPLERS:
            raise ValueError(f"sampler must be one of {self.SAMPLERS}, got {sampler!r}")
        self.sampler = sampler
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk  # long prompts go through in pieces: attention memory stays O(chunk * L)
        self._compiler = None

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

    def _rows(self, prompts, configs) -> list[_Row]:
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
            raise ValueError("prompts must be a non-empty list of strings or token-id lists")
        if isinstance(configs, GenerationConfig):
            configs = [configs] * len(prompts)
        if len(configs) != len(prompts):
            raise ValueError(f"{len(configs)} configs for {len(prompts)} prompts")
        rows = []
        for prompt, cfg in zip(prompts, configs, strict=True):
            if not isinstance(cfg, GenerationConfig):
                raise TypeError(f"config must be a GenerationConfig, got {type(cfg).__name__}")
            gen = self.generator(cfg.seed)
            eos = self.stop_ids(cfg.eos_token_ids, cfg.ignore_eos)
            guide = None
            if cfg.constraint is not None:
                guide = self.guide(cfg.constraint)
                eos = eos | {guide.eos_token_id}  # the automaton ends a match with the tokenizer's EOS
            rows.append(_Row(cfg, eos, gen, GenerationResult(self.encode(prompt)), guide))
        return rows

    # -- entry points -------------------------------------------------------------------------------

    def stream(self, prompts, config: GenerationConfig | Sequence[GenerationConfig] = GENERATION_DEFAULT
               ) -> Iterator[TokenEvent]:
        """Yield :class:`TokenEvent` s as tokens are chosen (rows interleaved, in request order per step)."""
        return self._run(self._rows(prompts, config), stream=True)

    def generate(self, prompts, config=None, *, strategy: str = "sample") -> list:
        """Run ``strategy`` (an exact name from :data:`workbench.engine.strategies.STRATEGIES`).

        ``"sample"`` (default; greedy when ``temperature == 0``) takes a :class:`GenerationConfig` or one per
        prompt and returns :class:`GenerationResult` s; ``"beam"`` takes a ``BeamConfig``.
        """
        from workbench.engine.strategies import get_strategy

        return get_strategy(strategy).generate(self, prompts, config)

    def sample(self, prompts, config: GenerationConfig | Sequence[GenerationConfig] = GENERATION_DEFAULT
               ) -> list[GenerationResult]:
        rows = self._rows(prompts, config)
        for _ in self._run(rows, stream=False):
            pass
        return [r.result for r in rows]

    # -- main loop ----------------------------------------------------------------------------------

    def prefill(self, rows_ids: Sequence[Sequence[int]], steps: int):
        """Left-pad ``rows_ids``, allocate a cache for ``steps`` more tokens and run the prompts.

        Returns ``(logits [B, V], mask [B, L + steps], next_positions [B, 1], cache, L)``.
        """
        B, L = len(rows_ids), max(len(p) for p in rows_ids)
        dev = self.device
        ids = torch.full((B, L), self.pad_id, dtype=torch.long, device=dev)
        mask = torch.zeros((B, L + steps), dtype=torch.long, device=dev)
        for i, p in enumerate(rows_ids):
            ids[i, L - len(p):] = torch.tensor(p, device=dev)
            mask[i, L - len(p): L] = 1
        positions = (mask[:, :L].cumsum(-1) - 1).clamp(min=0)
        if self._auto_backend:  # the model may have changed since (e.g. a dynamic RoPE scaling hook)
            from workbench.engine.backends import PackedLlamaBackend

            want = "hf" if PackedLlamaBackend.unsupported(self.model) else "packed-llama"
            if want != self.backend.name:
                self.backend = make_backend(self.model, want)
        cache = self.backend.new_cache(B, L + steps)
        with num_threads(self.threads.prefill if self.threads else None):
            for s in range(0, L, self.prefill_chunk):
                e = min(L, s + self.prefill_chunk)
                logits = self.backend.forward(ids[:, s:e], mask[:, :e], positions[:, s:e], cache)
        return logits, mask, positions[:, -1:] + 1, cache, L

    @torch.inference_mode()
    def _run(self, rows: list[_Row], stream: bool) -> Iterator[TokenEvent]:
        B, dev = len(rows), self.device
        steps = max(r.cfg.max_new_tokens for r in rows)
        logits, mask, next_pos, cache, L = self.prefill([r.result.prompt_ids for r in rows], steps)
        seen = torch.zeros((B, self.vocab_size), dtype=torch.bool, device=dev)
        counts = torch.zeros((B, self.vocab_size), dtype=torch.int32, device=dev)
        for i, r in enumerate(rows):
            seen[i, torch.tensor(r.result.prompt_ids, device=dev)] = True
        params = [r.cfg.sampling for r in rows]
        greedy = [p.greedy for p in params]
        gens = [r.generator for r in rows]
        constrained = [i for i, r in enumerate(rows) if r.guide is not None]
        fused = self._use_kernel(params)
        if fused:
            from workbench.kernels import sampling as ksampling

            kw = dict(temperature=[p.temperature for p in params], top_k=[p.top_k for p in params],
                      top_p=[p.top_p for p in params], min_p=[p.min_p for p in params],
                      seeds=[int(torch.randint(0, 2**62, (), generator=g, device=g.device)) for g in gens])

        with num_threads(self.threads.decode if self.threads else None):
            for t in range(steps):
                if constrained:
                    allowed = torch.ones_like(seen)
                    for i in constrained:
                        allowed[i] = rows[i].guide.allowed().to(dev)
                    logits = logits.masked_fill(~allowed, float("-inf"))
                if fused:
                    x = processors.process(logits, params, seen, counts, filters=False)
                    tokens = ksampling.sample(x, **kw, offset=t, impl="triton")
                else:
                    tokens = sampling.choose(processors.process(logits, params, seen, counts), greedy, gens)
                live = torch.tensor([i for i, r in enumerate(rows) if not r.done], device=dev)
                seen[live, tokens[live]] = True
                counts[live, tokens[live]] += 1
                token_list = tokens.tolist()
                for i in live.tolist():
                    event = self._advance(i, rows[i], token_list[i], stream)
                    if stream:
                        yield event
                if all(r.done for r in rows):
                    return
                mask[:, L + t] = 1
                logits = self.backend.forward(tokens.unsqueeze(1), mask[:, : L + t + 1], next_pos, cache)
                next_pos = next_pos + 1

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

    def _advance(self, i: int, r: _Row, tok: int, stream: bool) -> TokenEvent | None:
        res, cfg = r.result, r.cfg
        if tok in r.eos:
            r.done, res.finish_reason = True, "eos"
        else:
            res.token_ids.append(tok)
            if r.guide is not None:
                r.guide.advance(tok)
        if not r.done and len(res.token_ids) >= cfg.max_new_tokens:
            r.done, res.finish_reason = True, "length"
        if not (stream or cfg.stop_strings or r.done):
            return None  # text is only needed to stream, to find stop strings and at the end
        r.text += self._next_text(r)
        hold = 0
        if cfg.stop_strings:
            longest = max(len(s) for s in cfg.stop_strings)
            start = max(0, r.emitted - longest)
            hits = [p for p in (r.text.find(s, start) for s in cfg.stop_strings) if p >= 0]
            if hits:
                r.text, r.done, res.finish_reason = r.text[: min(hits)], True, "stop"
            else:
                hold = longest - 1  # a stop string may still be forming
        upto = len(r.text) if r.done else max(r.emitted, len(r.text) - hold)
        delta, r.emitted = r.text[r.emitted: upto], upto
        if r.done:
            res.text = r.text
        return TokenEvent(i, tok, delta, r.done, res.finish_reason)

    def _next_text(self, r: _Row) -> str:
        """Text added by the newest token (incremental detokenisation: a short window per step, not O(n)).

        Decodes ``ids[prefix:]`` and returns what extends the decode of ``ids[prefix:read]``, so characters
        spanning several tokens, and tokenizers that merge leading spaces, come out as a full decode would.
        """
        ids = r.result.token_ids
        dec = self.tokenizer.decode
        before = dec(ids[r.prefix: r.read], skip_special_tokens=True)
        after = dec(ids[r.prefix:], skip_special_tokens=True)
        if len(after) > len(before) and (r.done or not after.endswith("\ufffd")):
            r.prefix, r.read = r.read, len(ids)
            return after[len(before):]
        return ""  # an incomplete UTF-8 sequence: wait for the next token
