"""Prefill + decode loop over an HF causal LM with a preallocated (static) KV cache.

Batches of prompts with different lengths are left-padded; positions come from the attention mask,
so every row sees the same positions as it would alone. Each request has its own stop conditions
(EOS, stop strings, max tokens) and its own random generator.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from workbench.engine import processors, sampling
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
    emitted: int = 0  # characters of text already streamed
    done: bool = False


class Engine:
    def __init__(self, model, tokenizer, *, threads: ThreadPolicy | None = DEFAULT_POLICY):
        if not hasattr(model, "config") or not callable(model):
            raise TypeError("Engine needs a Hugging Face causal LM (a module with .config)")
        self.model = model
        self.tokenizer = tokenizer
        self.threads = threads
        self.device = next(model.parameters()).device
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = 0 if pad is None else pad

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

    def _default_eos(self) -> frozenset[int]:
        ids = self.model.generation_config.eos_token_id if hasattr(self.model, "generation_config") else None
        if ids is None:
            ids = self.tokenizer.eos_token_id
        if ids is None:
            return frozenset()
        return frozenset([ids] if isinstance(ids, int) else ids)

    def _rows(self, prompts, configs) -> list[_Row]:
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
            raise ValueError("prompts must be a non-empty list of strings or token-id lists")
        if isinstance(configs, GenerationConfig):
            configs = [configs] * len(prompts)
        if len(configs) != len(prompts):
            raise ValueError(f"{len(configs)} configs for {len(prompts)} prompts")
        rows = []
        for prompt, cfg in zip(prompts, configs, strict=True):
            gen = torch.Generator(device=self.device)
            gen.manual_seed(cfg.seed if cfg.seed is not None else int(torch.randint(0, 2**62, ()).item()))
            eos = frozenset() if cfg.ignore_eos else (
                frozenset(cfg.eos_token_ids) if cfg.eos_token_ids is not None else self._default_eos())
            rows.append(_Row(cfg, eos, gen, GenerationResult(self.encode(prompt))))
        return rows

    # -- model calls --------------------------------------------------------------------------------

    def _forward(self, ids, mask, positions, cache):
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                         logits_to_keep=1)
        return out.logits[:, -1]

    # -- main loop ----------------------------------------------------------------------------------

    def stream(self, prompts, config: GenerationConfig | Sequence[GenerationConfig] = GENERATION_DEFAULT
               ) -> Iterator[TokenEvent]:
        """Yield :class:`TokenEvent` s as tokens are chosen (rows interleaved, in request order per step)."""
        return self._run(self._rows(prompts, config))

    def generate(self, prompts, config: GenerationConfig | Sequence[GenerationConfig] = GENERATION_DEFAULT
                 ) -> list[GenerationResult]:
        rows = self._rows(prompts, config)
        for _ in self._run(rows):
            pass
        return [r.result for r in rows]

    @torch.inference_mode()
    def _run(self, rows: list[_Row]) -> Iterator[TokenEvent]:
        from transformers import StaticCache

        B = len(rows)
        L = max(len(r.result.prompt_ids) for r in rows)
        steps = max(r.cfg.max_new_tokens for r in rows)
        dev = self.device
        ids = torch.full((B, L), self.pad_id, dtype=torch.long, device=dev)
        mask = torch.zeros((B, L + steps), dtype=torch.long, device=dev)
        seen = torch.zeros((B, self.vocab_size), dtype=torch.bool, device=dev)
        counts = torch.zeros((B, self.vocab_size), dtype=torch.int32, device=dev)
        for i, r in enumerate(rows):
            p = torch.tensor(r.result.prompt_ids, device=dev)
            ids[i, L - len(p):] = p
            mask[i, L - len(p): L] = 1
            seen[i, p] = True
        positions = (mask[:, :L].cumsum(-1) - 1).clamp(min=0)
        cache = StaticCache(config=self.model.config, max_cache_len=L + steps)
        params = [r.cfg.sampling for r in rows]
        greedy = [p.greedy for p in params]
        gens = [r.generator for r in rows]

        with num_threads(self.threads.prefill if self.threads else None):
            logits = self._forward(ids, mask[:, :L], positions, cache)
        next_pos = positions[:, -1:] + 1
        with num_threads(self.threads.decode if self.threads else None):
            for t in range(steps):
                tokens = sampling.choose(processors.process(logits, params, seen, counts), greedy, gens)
                live = torch.tensor([i for i, r in enumerate(rows) if not r.done], device=dev)
                seen[live, tokens[live]] = True
                counts[live, tokens[live]] += 1
                token_list = tokens.tolist()
                for i in live.tolist():
                    yield self._advance(i, rows[i], token_list[i])
                if all(r.done for r in rows):
                    return
                mask[:, L + t] = 1
                logits = self._forward(tokens.unsqueeze(1), mask[:, : L + t + 1], next_pos, cache)
                next_pos = next_pos + 1

    def _advance(self, i: int, r: _Row, tok: int) -> TokenEvent:
        res, cfg = r.result, r.cfg
        if tok in r.eos:
            r.done, res.finish_reason = True, "eos"
        else:
            res.token_ids.append(tok)
        text = self.tokenizer.decode(res.token_ids, skip_special_tokens=True)
        hold = 0
        if cfg.stop_strings and not r.done:
            lookback = max(len(s) for s in cfg.stop_strings) + 16
            start = max(0, len(res.text) - lookback)
            hits = [p for p in (text.find(s, start) for s in cfg.stop_strings) if p >= 0]
            if hits:
                text, r.done, res.finish_reason = text[: min(hits)], True, "stop"
            else:
                hold = max(len(s) for s in cfg.stop_strings) - 1  # a stop string may still be forming
        if not r.done and len(res.token_ids) >= cfg.max_new_tokens:
            r.done, res.finish_reason = True, "length"
        res.text = text
        upto = len(text) if r.done else max(r.emitted, len(text) - hold)
        if not r.done and text[r.emitted:upto].endswith("\ufffd"):
            upto = r.emitted  # an incomplete UTF-8 sequence: wait for the next token
        delta, r.emitted = text[r.emitted:upto], upto
        return TokenEvent(i, tok, delta, r.done, res.finish_reason)

