"""Stop conditions, shared by every strategy: EOS ids, a token budget and stop strings, with incremental
detokenisation so streamed text equals a full decode."""

from __future__ import annotations

from collections.abc import Sequence

from workbench.engine.results import GenerationResult, TokenLogprob


class Stopper:
    """One request's stop state. :meth:`push` each chosen token; it returns the text to emit (streaming) and
    sets ``done`` / ``result.finish_reason`` ("eos", "stop" or "length")."""

    def __init__(self, tokenizer, result: GenerationResult, eos: frozenset[int], max_new_tokens: int,
                 stop_strings: Sequence[str] = (), guide=None, want_text: bool = False, logprobs: bool = False):
        self.tokenizer = tokenizer
        self.result = result
        self.eos = eos
        self.max_new_tokens = max_new_tokens
        self.stop_strings = tuple(stop_strings)
        self.longest = max((len(s) for s in self.stop_strings), default=0)
        self.guide = guide  # constrained.RowGuide: advanced with every kept token
        self.want_text = want_text  # decode as tokens come (streaming); else only when needed
        self.text = ""  # text decoded so far
        self.emitted = 0  # characters of it already returned
        self.prefix = 0  # incremental detokenisation window: token offsets
        self.read = 0
        self.done = False
        if logprobs:
            result.logprobs = []  # one per kept token

    def push(self, tok: int, logprob: TokenLogprob | None = None) -> tuple[str, bool]:
        """Take token ``tok`` (and its logprob, kept with it when the result collects them); returns
        ``(new text, kept)`` where ``kept`` is False for an EOS token."""
        res = self.result
        kept = tok not in self.eos
        if not kept:
            self.done, res.finish_reason = True, "eos"
        else:
            res.token_ids.append(tok)
            if res.logprobs is not None and logprob is not None:
                res.logprobs.append(logprob)
            if self.guide is not None:
                self.guide.advance(tok)
        if not self.done and len(res.token_ids) >= self.max_new_tokens:
            self.done, res.finish_reason = True, "length"
        if not (self.want_text or self.stop_strings or self.done):
            return "", kept  # text is only needed to stream, to find stop strings and at the end
        self.text += self._next_text()
        hold = 0
        if self.stop_strings:
            start = max(0, self.emitted - self.longest)
            hits = [p for p in (self.text.find(s, start) for s in self.stop_strings) if p >= 0]
            if hits:
                self.text, self.done, res.finish_reason = self.text[: min(hits)], True, "stop"
            else:
                hold = self.longest - 1  # a stop string may still be forming
        upto = len(self.text) if self.done else max(self.emitted, len(self.text) - hold)
        delta, self.emitted = self.text[self.emitted: upto], upto
        if self.done:
            res.text = self.text
        return delta, kept

    def _next_text(self) -> str:
        """Text added by the newest token (incremental detokenisation: a short window per step, not O(n)).

        Decodes ``ids[prefix:]`` and returns what extends the decode of ``ids[prefix:read]``, so characters
        spanning several tokens, and tokenizers that merge leading spaces, come out as a full decode would.
        """
        ids = self.result.token_ids
        dec = self.tokenizer.decode
        before = dec(ids[self.prefix: self.read], skip_special_tokens=True)
        after = dec(ids[self.prefix:], skip_special_tokens=True)
        if len(after) > len(before) and (self.done or not after.endswith("\ufffd")):
            self.prefix, self.read = self.read, len(ids)
            return after[len(before):]
        return ""  # an incomplete UTF-8 sequence: wait for the next token
