"""The OpenAI wire format: request bodies parsed and checked into engine configs, results rendered back.

Parameters follow the OpenAI API (``max_tokens`` / ``max_completion_tokens``, ``temperature``, ``top_p``,
``n``, ``stop``, ``seed``, penalties, ``logit_bias``, ``logprobs`` / ``top_logprobs``, ``response_format``),
plus vLLM's extras in the body (``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``) and ``strategy``
(``"sample"`` or ``"speculative"``). Every check raises :class:`APIError` naming the parameter.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from workbench.engine.config import GenerationConfig, SamplingParams

MAX_N = 8
MAX_STOP = 4
STRATEGIES = ("sample", "speculative")
FINISH = {"eos": "stop", "stop": "stop", "length": "length", None: None}  # engine -> OpenAI


class APIError(Exception):
    """An error the client gets as OpenAI's JSON: ``{"error": {"message", "type", "param", "code"}}``."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limit_exceeded", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):  # noqa: A002 - OpenAI's field name
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or self.TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# -- field readers --------------------------------------------------------------------------------

def _number(body: dict, name: str, default, lo=None, hi=None, *, integer: bool = False):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not float(v).is_integer()):
        raise bad(f"{name} must be {'an integer' if integer else 'a number'}, got {v!r}", name)
    if not math.isfinite(v):
        raise bad(f"{name} must be finite, got {v!r}", name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise bad(f"{name} must be in {rng}, got {v!r}", name)
    return int(v) if integer else float(v)


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise bad("stop must be a string or a list of strings", "stop")
    if len(items) > MAX_STOP:
        raise bad(f"stop takes at most {MAX_STOP} sequences, got {len(items)}", "stop")
    return tuple(s for s in items if s)


def _logit_bias(body: dict, vocab: int) -> dict[int, float]:
    v = body.get("logit_bias")
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise bad("logit_bias must be an object mapping token ids to biases", "logit_bias")
    out = {}
    for k, b in v.items():
        try:
            tok = int(k)
        except (TypeError, ValueError):
            raise bad(f"logit_bias key {k!r} is not a token id", "logit_bias") from None
        if not 0 <= tok < vocab:
            raise bad(f"logit_bias token id {tok} is out of range [0, {vocab})", "logit_bias")
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
            raise bad(f"logit_bias[{k}] must be a number in [-100, 100], got {b!r}", "logit_bias")
        out[tok] = float(b)
    return out


def _constraint(body: dict):
    rf = body.get("response_format")
    if rf is None:
        return None
    if not isinstance(rf, dict) or "type" not in rf:
        raise bad("response_format must be an object with a type", "response_format")
    from workbench.engine.constrained import JsonSchema

    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return JsonSchema({"type": "object"})
    if kind == "json_schema":
        spec = rf.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise bad("response_format.json_schema.schema must be a JSON schema object", "response_format")
        constraint = JsonSchema(schema)
        try:
            constraint.to_regex()
        except Exception as e:
            raise bad(f"invalid JSON schema: {e}", "response_format") from None
        return constraint
    raise bad(f"response_format.type must be text, json_object or json_schema, got {kind!r}", "response_format")


# -- the parsed request ---------------------------------------------------------------------------

@dataclass
class Parsed:
    """One API request, checked. ``prompts``: token ids (one entry per prompt; chat has one)."""
    kind: str  # "chat" | "completion"
    model: str
    prompts: list[list[int]]
    config: GenerationConfig
    n: int
    stream: bool
    include_usage: bool
    strategy: str
    logprobs: int | None  # alternatives per token (None: off)
    canonical: dict = field(default_factory=dict)  # every parameter that shapes the output (cache key)
    adapter: str | None = None  # LoRA adapter name (None: the base model)

    @property
    def deterministic(self) -> bool:
        """Greedy, or sampling with a seed: the same request gives the same output."""
        return self.config.sampling.greedy or self.config.seed is not None


UNSUPPORTED = {"tools": "tool calling", "functions": "function calling", "suffix": "suffix (insertion)",
               "audio": "audio output", "prediction": "predicted outputs"}


def parse(body, kind: str, *, engine, model_name: str, context: int, default_max_tokens: int) -> Parsed:
    """Check an OpenAI request body (``kind``: ``"chat"`` or ``"completion"``) against the served model."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model is required", "model")
    adapter = resolve_adapter(body, model, model_name, engine.adapters)
    for name, what in UNSUPPORTED.items():
        if body.get(name):
            raise bad(f"{what} is not supported by this server", name)
    if body.get("echo"):
        raise bad("echo is not supported by this server", "echo")
    tok = engine.tokenizer
    if kind == "chat":
        prompts = [_chat_prompt(tok, body.get("messages"))]
    else:
        prompts = _completion_prompts(engine, body.get("prompt"))
    n = _number(body, "n", 1, 1, MAX_N, integer=True)
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise bad("best_of is not supported (other than best_of == n)", "best_of")
    max_tokens = _number(body, "max_completion_tokens", None, 1, integer=True) if kind == "chat" else None
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", None, 1, integer=True)
    longest = max(len(p) for p in prompts)
    if longest >= context:
        raise bad(f"the prompt is {longest} tokens; this model's maximum context length is {context}",
                  "messages" if kind == "chat" else "prompt", "context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(default_max_tokens, context - longest)
    elif longest + max_tokens > context:
        raise bad(f"the prompt ({longest} tokens) plus max_tokens ({max_tokens}) exceeds this model's maximum "
                  f"context length of {context}", "max_tokens", "context_length_exceeded")
    if kind == "chat":
        want_lp = body.get("logprobs")
        if want_lp is not None and not isinstance(want_lp, bool):
            raise bad("logprobs must be a boolean", "logprobs")
        top = _number(body, "top_logprobs", None, 0, 20, integer=True)
        if top is not None and not want_lp:
            raise bad("top_logprobs needs logprobs: true", "top_logprobs")
        logprobs = (top or 0) if want_lp else None
    else:
        logprobs = _number(body, "logprobs", None, 0, 20, integer=True)
    try:
        sampling = SamplingParams(
            temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
            top_p=_number(body, "top_p", 1.0, 0.0, 1.0) or 1e-9,  # top_p = 0 keeps the most likely token
            top_k=max(0, _number(body, "top_k", 0, -1, integer=True)),  # -1 (vLLM) or 0: off
            min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
            repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0),
            frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
            presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
            logit_bias=_logit_bias(body, engine.vocab_size),
        )
    except ValueError as e:
        raise bad(str(e)) from None
    seed = _number(body, "seed", None, integer=True)
    strategy = body.get("strategy", "sample")
    if strategy not in STRATEGIES:
        raise bad(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}", "strategy")
    constraint = _constraint(body)
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise bad("ignore_eos must be a boolean", "ignore_eos")
    if constraint is not None and ignore_eos:
        raise bad("ignore_eos cannot be combined with response_format", "ignore_eos")
    if strategy != "sample" and (constraint is not None or n > 1):
        raise bad(f"strategy {strategy!r} takes n = 1 and no response_format", "strategy")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream must be a boolean", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise bad("stream_options must be an object", "stream_options")
    try:
        config = GenerationConfig(max_new_tokens=max_tokens, sampling=sampling, stop_strings=_stop(body),
                                  seed=seed, constraint=constraint, logprobs=logprobs, ignore_eos=ignore_eos)
    except ValueError as e:
        raise bad(str(e)) from None
    canonical = {
        "kind": kind, "prompts": prompts, "n": n, "max_tokens": max_tokens, "logprobs": logprobs,
        "sampling": {k: getattr(sampling, k) for k in ("temperature", "top_p", "top_k", "min_p", "typical_p",
                                                       "repetition_penalty", "frequency_penalty",
                                                       "presence_penalty")},
        "logit_bias": sorted(sampling.logit_bias.items()), "stop": list(config.stop_strings), "seed": seed,
        "response_format": body.get("response_format"), "ignore_eos": ignore_eos, "strategy": strategy,
        "adapter": [adapter, engine.adapters.fingerprint(adapter)] if adapter else None,
    }
    return Parsed(kind, model, prompts, config, n, stream, bool(opts.get("include_usage")), strategy, logprobs,
                  canonical, adapter)


def resolve_adapter(body: dict, model: str, model_name: str, registry) -> str | None:
    """The LoRA adapter a request asks for: the model ``SERVED:ADAPTER`` (as LoRAX and vLLM name them) or the
    body field ``adapter``; None for the base model."""
    names = registry.names if registry is not None else []
    served = [model_name, *(f"{model_name}:{a}" for a in names)]
    if model not in served:
        raise bad(f"model {model!r} is not served here; this server serves {', '.join(map(repr, served))}", "model",
                  "model_not_found")
    adapter = model[len(model_name) + 1:] or None
    field_value = body.get("adapter")
    if field_value is not None:
        if not isinstance(field_value, str) or field_value not in names:
            raise bad(f"adapter {field_value!r} is not loaded; loaded: {', '.join(names) or '(none)'}", "adapter",
                      "model_not_found")
        if adapter is not None and adapter != field_value:
            raise bad(f"the model names adapter {adapter!r} but the adapter field says {field_value!r}", "adapter")
        adapter = field_value
    return adapter


def _chat_prompt(tokenizer, messages) -> list[int]:
    from workbench.chat import prompt_ids

    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise bad(f"messages[{i}] needs a role of system, developer, user or assistant", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is understood here
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad(f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content must be a string or a list of text parts", "messages")
        clean.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    try:
        return prompt_ids(tokenizer, clean)
    except ValueError as e:
        raise bad(str(e), "messages") from None


def _completion_prompts(engine, prompt) -> list[list[int]]:
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
        items = [prompt]
    elif isinstance(prompt, list) and prompt:
        items = prompt
    else:
        raise bad("prompt must be a string, a list of strings, or token ids", "prompt")
    out = []
    for p in items:
        if not (isinstance(p, str) or (isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                                                   for t in p))):
            raise bad("each prompt must be a string or a list of token ids", "prompt")
        try:
            out.append(engine.encode(p))
        except ValueError as e:
            raise bad(str(e), "prompt") from None
    return out


# -- rendering ------------------------------------------------------------------------------------

@dataclass
class Choice:
    """What one choice produced: its kept token ids, and per streamed event the text delta and the logprob
    entry ``[token_id, logprob, [[alt_id, alt_logprob], ...]]`` (None when not asked for, or for an EOS)."""
    index: int
    token_ids: list[int] = field(default_factory=list)
    deltas: list[str] = field(default_factory=list)
    lps: list = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.deltas)

    @property
    def logprobs(self) -> list:
        return [e for e in self.lps if e is not None]

    def add(self, delta: str, token_id: int | None, logprob) -> None:
        """One event: ``token_id`` None for an EOS (not part of the output)."""
        if token_id is not None:
            self.token_ids.append(token_id)
        self.deltas.append(delta)
        self.lps.append(None if logprob is None else [logprob.token_id, logprob.logprob, [list(a) for a in logprob.top]])

    def to_json(self) -> dict:
        return {"index": self.index, "token_ids": self.token_ids, "deltas": self.deltas, "lps": self.lps,
                "finish_reason": self.finish_reason}

    @classmethod
    def from_json(cls, d: dict) -> Choice:
        return cls(d["index"], list(d["token_ids"]), list(d["deltas"]), list(d["lps"]), d["finish_reason"])


class Renderer:
    """OpenAI response objects for one request (ids, timestamps and token strings)."""

    def __init__(self, tokenizer, kind: str, model: str, rid: str, created: int, fingerprint: str):
        self.tok, self.kind, self.model, self.id, self.created = tokenizer, kind, model, rid, created
        self.fingerprint = fingerprint
        self._bytes = None

    def token_str(self, tid: int) -> str:
        return self.tok.decode([tid])

    def token_bytes(self, tid: int) -> list[int]:
        if self._bytes is None:
            from workbench.engine.constrained import token_bytes

            self._bytes = token_bytes(self.tok)
        return list(self._bytes.get(tid, self.token_str(tid).encode()))

    def _chat_logprobs(self, entries) -> dict:
        def item(tid, lp):
            return {"token": self.token_str(tid), "logprob": lp, "bytes": self.token_bytes(tid)}
        return {"content": [dict(item(t, lp), top_logprobs=[item(a, alp) for a, alp in alts])
                            for t, lp, alts in entries], "refusal": None}

    def _completion_logprobs(self, entries, offset: int) -> dict:
        tokens, lps, tops, offsets = [], [], [], []
        for t, lp, alts in entries:
            s = self.token_str(t)
            tokens.append(s)
            lps.append(lp)
            tops.append({self.token_str(a): alp for a, alp in alts})
            offsets.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def usage(self, prompt_tokens: int, choices: list[Choice]) -> dict:
        comp = sum(len(c.token_ids) for c in choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": comp, "total_tokens": prompt_tokens + comp}

    def response(self, choices: list[Choice], prompt_tokens: int, want_logprobs: bool) -> dict:
        out = []
        for c in choices:
            if self.kind == "chat":
                out.append({"index": c.index, "message": {"role": "assistant", "content": c.text, "refusal": None},
                            "logprobs": self._chat_logprobs(c.logprobs) if want_logprobs else None,
                            "finish_reason": FINISH[c.finish_reason]})
            else:
                out.append({"index": c.index, "text": c.text,
                            "logprobs": self._completion_logprobs(c.logprobs, 0) if want_logprobs else None,
                            "finish_reason": FINISH[c.finish_reason]})
        return {"id": self.id, "object": "chat.completion" if self.kind == "chat" else "text_completion",
                "created": self.created, "model": self.model, "system_fingerprint": self.fingerprint,
                "choices": out, "usage": self.usage(prompt_tokens, choices)}

    def chunk(self, index: int, *, text: str | None = None, role: bool = False, logprobs=None,
              finish_reason: str | None = None, offset: int = 0) -> dict:
        if self.kind == "chat":
            delta = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta,
                      "logprobs": self._chat_logprobs(logprobs) if logprobs is not None else None,
                      "finish_reason": FINISH[finish_reason]}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": index, "text": text or "",
                      "logprobs": self._completion_logprobs(logprobs, offset) if logprobs is not None else None,
                      "finish_reason": FINISH[finish_reason]}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint, "choices": [choice]}

    def usage_chunk(self, prompt_tokens: int, choices: list[Choice]) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint, "choices": [],
                "usage": self.usage(prompt_tokens, choices)}


def sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
