"""Constrained decoding: regex and JSON-schema constraints compiled to a token-level automaton.

The regex is compiled by outlines-core into an index over the tokenizer's vocabulary (each token as the raw
bytes it stands for); at every step the engine masks the logits to the tokens the automaton allows, and EOS is
allowed only in accepting states, so a request that ends with EOS always matches the whole pattern.
A request that hits ``max_new_tokens`` first ends with ``finish_reason == "length"`` and may be incomplete.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import torch

from workbench.errors import WorkbenchError


class ConstraintError(WorkbenchError, ValueError):
    """A constraint that cannot be compiled or used with this tokenizer."""


@dataclass(frozen=True)
class Regex:
    """Output must match ``pattern`` in full (Rust ``regex`` syntax as used by outlines-core)."""

    pattern: str

    def __post_init__(self):
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ConstraintError("Regex needs a non-empty pattern string")

    def to_regex(self) -> str:
        return self.pattern


@dataclass(frozen=True)
class JsonSchema:
    """Output must be a JSON document valid under ``schema`` (a dict or a JSON string).

    ``whitespace`` is the regex allowed between tokens (default: outlines-core's ``[ ]?``);
    bound string lengths (``maxLength``) and array sizes if you need outputs to finish within a budget.
    """

    schema: dict | str
    whitespace: str | None = None

    def to_regex(self) -> str:
        from outlines_core.json_schema import build_regex_from_schema

        text = self.schema if isinstance(self.schema, str) else json.dumps(self.schema)
        try:
            json.loads(text)
            return build_regex_from_schema(text, self.whitespace)
        except (ValueError, TypeError) as exc:  # outlines-core raises ValueError for unsupported schemas
            raise ConstraintError(f"cannot compile JSON schema: {exc}") from exc


CONSTRAINT_TYPES = (Regex, JsonSchema)


# -- tokenizer vocabulary as bytes ---------------------------------------------------------------------


def _gpt2_unicode_to_byte() -> dict[str, int]:
    # GPT-2's byte-level BPE alphabet: printable latin-1 bytes stand for themselves, the others for 256 + n.
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {chr(b): b for b in keep}, 0
    for b in range(256):
        if b not in keep:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _decoder_kind(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = json.loads(backend.decoder.__getstate__()) if backend is not None and backend.decoder else {}
    kinds = [state.get("type")] + [d.get("type") for d in state.get("decoders", [])]
    if "ByteLevel" in kinds:
        return "bytelevel"
    if "ByteFallback" in kinds or "Metaspace" in kinds:
        return "sentencepiece"
    raise ConstraintError(f"constrained decoding does not know how to map tokens of {type(tokenizer).__name__} "
                          f"(decoder {state.get('type')!r}) to bytes")


def token_bytes(tokenizer) -> dict[int, bytes]:
    """Each ordinary token id -> the bytes it decodes to (special and empty tokens left out)."""
    kind = _decoder_kind(tokenizer)
    special = set(tokenizer.all_special_ids)
    special |= {tid for tid, added in getattr(tokenizer, "added_tokens_decoder", {}).items() if added.special}
    u2b = _gpt2_unicode_to_byte()
    out = {}
    for tok, tid in tokenizer.get_vocab().items():
        if tid in special:
            continue
        if kind == "bytelevel":
            if any(ch not in u2b for ch in tok):
                continue  # an added non-byte-level token: not producible as plain text
            raw = bytes(u2b[ch] for ch in tok)
        elif len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            raw = bytes([int(tok[3:5], 16)])
        else:
            raw = tok.replace("\u2581", " ").encode()
        if raw:
            out[tid] = raw
    return out


class Compiler:
    """Builds outlines-core indexes for one tokenizer, caching the vocabulary and compiled patterns."""

    def __init__(self, tokenizer, eos_token_id: int, vocab_size: int):
        from outlines_core import Vocabulary

        if eos_token_id is None:
            raise ConstraintError("constrained decoding needs an EOS token id")
        grouped: dict[bytes, list[int]] = {}
        for tid, raw in token_bytes(tokenizer).items():
            if tid < vocab_size and tid != eos_token_id:
                grouped.setdefault(raw, []).append(tid)
        self.eos_token_id = eos_token_id
        self.vocab_size = vocab_size
        self.vocabulary = Vocabulary(eos_token_id, grouped)
        self._index = lru_cache(maxsize=32)(self._build)

    def _build(self, regex: str):
        from outlines_core import Index

        try:
            return Index(regex, self.vocabulary)
        except (ValueError, RuntimeError) as exc:
            raise ConstraintError(f"cannot compile constraint regex {regex!r}: {exc}") from exc

    def guide(self, constraint) -> RowGuide:
        if not isinstance(constraint, CONSTRAINT_TYPES):
            raise ConstraintError(f"constraint must be Regex or JsonSchema, got {type(constraint).__name__}")
        return RowGuide(self._index(constraint.to_regex()), self.vocab_size, self.eos_token_id)


class RowGuide:
    """One request's position in the automaton."""

    def __init__(self, index, vocab_size: int, eos_token_id: int):
        from outlines_core import Guide

        self.guide = Guide(index)
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self._words = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)
        self._shifts = torch.arange(32, dtype=torch.int32)

    def allowed(self) -> torch.Tensor:
        """Boolean ``[vocab]`` mask of the tokens allowed now."""
        self._words.zero_()
        self.guide.write_mask_into(self._words.data_ptr(), self._words.numel(), 4)
        bits = (self._words[:, None] >> self._shifts) & 1
        return bits.flatten()[: self.vocab_size].bool()

    def advance(self, token_id: int) -> None:
        if token_id != self.eos_token_id:
            self.guide.advance(token_id, return_tokens=False)

    @property
    def complete(self) -> bool:
        """In an accepting state (EOS allowed)."""
        return self.guide.is_finished()
