"""Load-test helper for OpenAI-compatible servers: N concurrent streaming clients over httpx + SSE.

Used by ``experiments/bench_serve.py`` and by the server tests (e.g. "50 concurrent streaming clients")::

    from serve_load import run_clients            # tests/ is on sys.path under pytest
    results = asyncio.run(run_clients("http://127.0.0.1:8000", "smollm2-135m-instruct",
                                      ["What is the capital of France?"], concurrency=50, max_tokens=16))
    assert all(r.ok and r.tokens == 16 for r in results)

Each client sends ``requests_per_client`` streaming requests back to back; client ``c``'s request ``j`` uses
``prompts[(c * requests_per_client + j) % len(prompts)]``. A prompt is a user message (``str``) or a full
message list (chat), or the prompt text (``endpoint="completions"``). Errors are recorded on the result, never
raised, so one failing request does not hide the others.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx

Prompt = str | list[dict]


@dataclass
class ClientResult:
    """One streamed request.

    ``tokens`` is the completion token count: ``usage.completion_tokens`` when the server sends usage, else the
    ``count_tokens`` function given to :func:`run_clients` applied to the text, else the number of non-empty
    content deltas streamed (``chunks``; one per token on servers that stream token by token).
    ``ttft`` is the time from sending the request to the first non-empty content delta (None if none came),
    ``latency`` the time to the end of the stream; both in seconds. ``start``/``end`` are ``time.perf_counter``
    stamps.
    """

    client: int
    index: int
    prompt: Prompt
    text: str = ""
    tokens: int = 0
    chunks: int = 0
    usage_tokens: int | None = None
    prompt_tokens: int | None = None
    ttft: float | None = None
    latency: float = 0.0
    finish_reason: str | None = None
    error: str | None = None
    status: int | None = None
    start: float = 0.0
    end: float = 0.0
    token_times: list[float] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None


def _body(endpoint: str, model: str, prompt: Prompt, max_tokens: int, temperature: float,
          include_usage: bool, extra_body: dict | None) -> dict:
    body: dict = {"model": model, "max_tokens": max_tokens, "temperature": temperature, "stream": True}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    elif endpoint == "completions":
        if not isinstance(prompt, str):
            raise TypeError("endpoint='completions' takes str prompts")
        body["prompt"] = prompt
    else:
        raise ValueError(f"endpoint must be 'chat' or 'completions', not {endpoint!r}")
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    if extra_body:
        body.update(extra_body)
    return body


def _delta_text(endpoint: str, choice: dict) -> str:
    if endpoint == "chat":
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


async def stream_one(http: httpx.AsyncClient, url: str, body: dict, result: ClientResult, endpoint: str,
                     count_tokens: Callable[[str], int] | None = None) -> ClientResult:
    """Send one streaming request and fill ``result`` (timings, text, tokens, finish reason or error)."""
    parts: list[str] = []
    t0 = time.perf_counter()
    result.start = t0
    try:
        async with http.stream("POST", url, json=body) as resp:
            result.status = resp.status_code
            if resp.status_code != 200:
                detail = (await resp.aread()).decode(errors="replace")[:500]
                result.error = f"HTTP {resp.status_code}: {detail}"
            else:
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    try:
                        chunk = json.loads(data)
                    except json.JSONDecodeError:
                        result.error = f"bad SSE data: {data[:200]}"
                        break
                    if "error" in chunk:
                        result.error = f"server error in stream: {chunk['error']}"
                        break
                    for choice in chunk.get("choices") or []:
                        text = _delta_text(endpoint, choice)
                        if text:
                            now = time.perf_counter()
                            if result.ttft is None:
                                result.ttft = now - t0
                            result.token_times.append(now - t0)
                            result.chunks += 1
                            parts.append(text)
                        if choice.get("finish_reason"):
                            result.finish_reason = choice["finish_reason"]
                    usage = chunk.get("usage")
                    if usage:
                        result.usage_tokens = usage.get("completion_tokens")
                        result.prompt_tokens = usage.get("prompt_tokens")
    except (httpx.HTTPError, OSError) as e:
        result.error = f"{type(e).__name__}: {e}"
    result.end = time.perf_counter()
    result.latency = result.end - t0
    result.text = "".join(parts)
    if result.usage_tokens is not None:
        result.tokens = result.usage_tokens
    elif count_tokens is not None:
        result.tokens = count_tokens(result.text)
    else:
        result.tokens = result.chunks
    return result


async def run_clients(base_url: str, model: str, prompts: Sequence[Prompt], concurrency: int, max_tokens: int,
                      api_key: str | None = None, *, requests_per_client: int = 1, temperature: float = 0.0,
                      endpoint: str = "chat", include_usage: bool = True, extra_body: dict | None = None,
                      timeout: float = 600.0, count_tokens: Callable[[str], int] | None = None
                      ) -> list[ClientResult]:
    """Run ``concurrency`` streaming clients at once, each sending ``requests_per_client`` requests back to
    back; returns every request's :class:`ClientResult`, ordered by (client, request).

    ``base_url`` is the server root (``http://host:port``) or its ``/v1`` root. ``include_usage`` sends
    ``stream_options: {"include_usage": true}`` (servers that send usage anyway, like ``transformers serve``,
    ignore it). ``extra_body`` is merged into every request body.
    """
    if concurrency < 1 or requests_per_client < 1 or not prompts:
        raise ValueError("need concurrency >= 1, requests_per_client >= 1 and at least one prompt")
    root = base_url.rstrip("/")
    root = root if root.endswith("/v1") else root + "/v1"
    url = root + ("/chat/completions" if endpoint == "chat" else "/completions")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=httpx.Timeout(timeout)) as http:
        async def client(c: int) -> list[ClientResult]:
            out = []
            for j in range(requests_per_client):
                prompt = prompts[(c * requests_per_client + j) % len(prompts)]
                body = _body(endpoint, model, prompt, max_tokens, temperature, include_usage, extra_body)
                out.append(await stream_one(http, url, body, ClientResult(c, j, prompt), endpoint, count_tokens))
            return out

        per_client = await asyncio.gather(*(client(c) for c in range(concurrency)))
    return [r for rs in per_client for r in rs]
