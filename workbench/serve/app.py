"""The OpenAI-compatible HTTP server (FastAPI): routes, auth, errors, streaming and the cache around the
engine worker (:mod:`workbench.serve.scheduler`).

Every error reaches the client as OpenAI's error JSON with a 4xx/5xx status; tracebacks go to the log only.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from workbench.serve import protocol
from workbench.serve.cache import CacheConfig, CompletionCache, cache_key
from workbench.serve.identity import model_identity
from workbench.serve.metrics import Metrics
from workbench.serve.protocol import APIError, Choice, Parsed, Renderer, bad
from workbench.serve.scheduler import Event, Job, QueueFull, Scheduler

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 << 20


@dataclass
class ServeConfig:
    """``daert serve`` settings. ``context``: None = the model's ``max_position_embeddings``."""
    model: str = "smollm2-135m-instruct"
    served_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    cache_url: str | None = None
    cache_ttl_s: int = 7 * 24 * 3600
    cache_max_entry_bytes: int = 1 << 20
    max_batch: int = 16
    max_queue: int = 64
    default_max_tokens: int = 256
    context: int | None = None
    embed_layer: int = -1

    def __post_init__(self):
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in [1, 65535], got {self.port}")
        if self.max_batch < 1 or self.max_queue < 0 or self.default_max_tokens < 1:
            raise ValueError("max_batch and default_max_tokens must be >= 1, max_queue >= 0")
        if self.api_key is not None and not self.api_key:
            raise ValueError("the API key must not be empty")
        if self.cache_url is not None:
            CacheConfig(self.cache_url, self.cache_ttl_s, self.cache_max_entry_bytes)  # checks


class Server:
    """The engine, its worker and the cache behind the routes (one model per server)."""

    def __init__(self, engine, config: ServeConfig):
        self.engine, self.config = engine, config
        self.name = config.served_name or config.model
        mc = engine.model.config
        self.context = config.context or getattr(mc, "max_position_embeddings", None) or 2048
        n_layers = getattr(mc, "num_hidden_layers", None)
        if n_layers is not None and not -(n_layers + 1) <= config.embed_layer <= n_layers:
            raise ValueError(f"embed layer {config.embed_layer} out of range for {n_layers} layers")
        self.metrics = Metrics()
        self.scheduler = Scheduler(engine, max_batch=config.max_batch, max_queue=config.max_queue,
                                   on_step=self.metrics.step)
        self.cache = (CompletionCache(CacheConfig(config.cache_url, config.cache_ttl_s,
                                                  config.cache_max_entry_bytes)) if config.cache_url else None)
        self.created = int(time.time())

    def identity(self) -> dict:
        return model_identity(self.engine, self.name)

    def fingerprint(self) -> str:
        return "fp_" + self.identity()["weights"][:12]


def create_app(server: Server):
    @asynccontextmanager
    async def lifespan(app):
        server.scheduler.start()
        try:
            yield
        finally:
            server.scheduler.close()
            if server.cache is not None:
                await server.cache.close()

    app = FastAPI(title="daert workbench", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    cfg = server.config

    def error(e: APIError, endpoint: str = "") -> JSONResponse:
        if endpoint:
            server.metrics.request(endpoint, e.status)
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error(e, request.url.path)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        msg = {404: f"unknown route {request.method} {request.url.path}",
               405: f"method {request.method} not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return error(APIError(e.status_code, msg, code="not_found" if e.status_code == 404 else None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e):
        return error(bad(f"invalid request: {e.errors()}"), request.url.path)

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error(APIError(500, "internal server error", type="server_error"), request.url.path)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        path = request.url.path
        if cfg.api_key is not None and path != "/health":
            header = request.headers.get("authorization", "")
            if not header.startswith("Bearer ") or header[7:] != cfg.api_key:
                what = "no API key provided" if not header else "incorrect API key provided"
                return error(APIError(401, f"{what}; pass it as 'Authorization: Bearer KEY'",
                                      code="invalid_api_key"), path)
        return await call_next(request)

    async def read_json(request: Request):
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise APIError(413, f"request body over {MAX_BODY_BYTES} bytes")
        try:
            return json.loads(raw)
        except ValueError as e:
            raise bad(f"malformed JSON body: {e}") from None

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.name, "batch_size": server.scheduler.batch_size,
                "queue_depth": server.scheduler.queue_depth}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics.render(queue_depth=server.scheduler.queue_depth, cache=server.cache),
                                 media_type="text/plain; version=0.0.4")

    def served_names() -> list[str]:
        reg = server.engine.adapters
        return [server.name, *(f"{server.name}:{a}" for a in (reg.names if reg is not None else []))]

    def model_card(name: str):
        card = {"id": name, "object": "model", "created": server.created, "owned_by": "daert"}
        if name != server.name:
            card["parent"] = server.name  # a LoRA adapter on the base model
        return card

    @app.get("/v1/models")
    async def models():
        server.metrics.request("/v1/models", 200)
        return {"object": "list", "data": [model_card(n) for n in served_names()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name not in served_names():
            raise APIError(404, f"model {name!r} is not served here", param="model", code="model_not_found")
        return model_card(name)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await complete(request, "chat", "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, "completion", "/v1/completions")

    async def complete(request: Request, kind: str, endpoint: str):
        body = await read_json(request)
        p = protocol.parse(body, kind, engine=server.engine, model_name=server.name, context=server.context,
                           default_max_tokens=cfg.default_max_tokens)
        prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
        r = Renderer(server.engine.tokenizer, kind, p.model, prefix + uuid.uuid4().hex, int(time.time()),
                     server.fingerprint())
        key = cache_key(server.identity(), p.canonical) if server.cache is not None and p.deterministic else None
        cached = await server.cache.get(key) if key else None
        prompt_tokens = sum(len(x) for x in p.prompts)
        if cached is not None:
            choices = [Choice.from_json(c) for c in cached["choices"]]
            server.metrics.request(endpoint, 200)
            if p.stream:
                return StreamingResponse(replay(r, p, choices, prompt_tokens), media_type="text/event-stream")
            return r.response(choices, prompt_tokens, p.logprobs is not None)
        run = Run(server, p)
        run.submit()  # 429 when the queue is full, before any byte is sent
        server.metrics.request(endpoint, 200)
        if p.stream:
            return StreamingResponse(stream(request, r, p, run, prompt_tokens, key), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            async for _ in run.events(request):
                pass
        finally:
            run.cancel()
        choices = run.choices
        server.metrics.tokens(prompt_tokens, sum(len(c.token_ids) for c in choices))
        if key:
            await server.cache.put(key, {"choices": [c.to_json() for c in choices]})
        return r.response(choices, prompt_tokens, p.logprobs is not None)

    async def replay(r: Renderer, p: Parsed, choices: list[Choice], prompt_tokens: int):
        for c in choices:
            async for chunk in _chunks(r, p, c.index, list(zip(c.deltas, c.lps, strict=True)), c.finish_reason):
                yield chunk
        if p.include_usage:
            yield protocol.sse(r.usage_chunk(prompt_tokens, choices))
        yield protocol.SSE_DONE

    async def stream(request, r: Renderer, p: Parsed, run: Run, prompt_tokens: int, key):
        started: set[int] = set()
        offsets: dict[int, int] = {}
        try:
            async for index, ev in run.events(request):
                out = []
                if index not in started and p.kind == "chat":
                    started.add(index)
                    out.append(r.chunk(index, text="", role=True))
                lp = run.choices[index].lps[-1]
                if ev.text or lp is not None:
                    out.append(r.chunk(index, text=ev.text, logprobs=[lp] if lp is not None else None,
                                       offset=offsets.get(index, 0)))
                    offsets[index] = offsets.get(index, 0) + len(ev.text)
                if ev.finished:
                    out.append(r.chunk(index, text=None if p.kind == "chat" else "", finish_reason=ev.finish_reason))
                for obj in out:
                    yield protocol.sse(obj)
        except APIError as e:
            yield protocol.sse(e.body())
            yield protocol.SSE_DONE
            return
        finally:
            run.cancel()  # a client that went away frees its rows at the next step
        choices = run.choices
        server.metrics.tokens(prompt_tokens, sum(len(c.token_ids) for c in choices))
        if p.include_usage:
            yield protocol.sse(r.usage_chunk(prompt_tokens, choices))
        yield protocol.SSE_DONE
        if key:
            await server.cache.put(key, {"choices": [c.to_json() for c in choices]})

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await read_json(request)
        ids, dims, fmt = _embedding_request(server, body)
        from workbench.serve.embeddings import embed, truncate

        def task():
            return truncate(embed(server.engine.model, ids, layer=cfg.embed_layer, pad_id=server.engine.pad_id), dims)

        vecs = await asyncio.to_thread(server.scheduler.run_task, task)
        data = []
        for i, v in enumerate(vecs):
            emb = (base64.b64encode(v.float().numpy().astype("<f4").tobytes()).decode() if fmt == "base64"
                   else v.tolist())
            data.append({"object": "embedding", "index": i, "embedding": emb})
        n = sum(len(x) for x in ids)
        server.metrics.request("/v1/embeddings", 200)
        server.metrics.tokens(n, 0)
        return {"object": "list", "data": data, "model": server.name,
                "usage": {"prompt_tokens": n, "total_tokens": n}}

    return app


def _chunk_list(r, p, index, events, finish):
    out = []
    if p.kind == "chat":
        out.append(r.chunk(index, text="", role=True))
    offset = 0
    for delta, lp in events:
        if delta or lp is not None:
            out.append(r.chunk(index, text=delta, logprobs=[lp] if lp is not None else None, offset=offset))
            offset += len(delta)
    out.append(r.chunk(index, text=None if p.kind == "chat" else "", finish_reason=finish))
    return out


async def _chunks(r, p, index, events, finish):
    for obj in _chunk_list(r, p, index, events, finish):
        yield protocol.sse(obj)


def _embedding_request(server: Server, body) -> tuple[list[list[int]], int | None, str]:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    if body.get("model") != server.name:
        if isinstance(body.get("model"), str) and body["model"].startswith(server.name + ":"):
            raise bad("embeddings come from the base model; adapters are not applied to them", "model")
        raise bad(f"model {body.get('model')!r} is not served here; this server serves {server.name!r}", "model",
                  "model_not_found")
    inp = body.get("input")
    if isinstance(inp, str) or (isinstance(inp, list) and inp and all(isinstance(t, int) for t in inp)):
        inp = [inp]
    if not isinstance(inp, list) or not inp:
        raise bad("input must be a string, a list of strings or token ids", "input")
    ids = []
    for x in inp:
        if not (isinstance(x, str) or (isinstance(x, list) and all(isinstance(t, int) for t in x))):
            raise bad("each input must be a string or a list of token ids", "input")
        try:
            t = server.engine.encode(x)
        except ValueError as e:
            raise bad(str(e), "input") from None
        if len(t) > server.context:
            raise bad(f"an input is {len(t)} tokens; the maximum is {server.context}", "input",
                      "context_length_exceeded")
        ids.append(t)
    d = server.engine.model.config.hidden_size
    dims = protocol._number(body, "dimensions", None, 1, d, integer=True)
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise bad(f"encoding_format must be float or base64, got {fmt!r}", "encoding_format")
    return ids, dims, fmt


class Run:
    """One request's jobs in the scheduler and the events coming back from the engine thread."""

    def __init__(self, server: Server, p: Parsed):
        self.server, self.p = server, p
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.choices = [Choice(i) for i in range(len(p.prompts) * p.n)]
        self.jobs: list[Job] = []
        self.open = len(self.choices)

    def _job(self, k: int, prompt: list[int]) -> Job:
        p = self.p

        def emit(ev):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (k, ev))

        strategy_config = None
        if p.strategy == "speculative":
            from workbench.engine.speculative import SpeculativeConfig

            c = p.config
            strategy_config = SpeculativeConfig(max_new_tokens=c.max_new_tokens, sampling=c.sampling,
                                                seed=c.seed, stop_strings=c.stop_strings, logprobs=c.logprobs,
                                                ignore_eos=c.ignore_eos)
        return Job(prompt, p.config, emit, n=p.n, strategy=p.strategy, strategy_config=strategy_config,
                   adapter=p.adapter)

    def submit(self) -> None:
        try:
            for k, prompt in enumerate(self.p.prompts):
                job = self._job(k, prompt)
                self.server.scheduler.submit(job)
                self.jobs.append(job)
        except QueueFull as e:
            self.cancel()
            raise APIError(429, f"{e}; retry later", code="rate_limit_exceeded") from None
        except ValueError as e:
            self.cancel()
            raise bad(str(e)) from None

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()

    async def events(self, request):
        """Yield ``(choice index, Event)`` until every choice has finished."""
        first = True
        while self.open:
            try:
                k, ev = await asyncio.wait_for(self.queue.get(), 1.0)
            except TimeoutError:
                if await request.is_disconnected():
                    self.cancel()
                    return
                continue
            if isinstance(ev, BaseException):
                from workbench.lora import AdapterBusyError

                if isinstance(ev, AdapterBusyError):
                    raise APIError(429, f"{ev}; retry later", code="rate_limit_exceeded")
                if isinstance(ev, ValueError):
                    raise bad(str(ev))
                log.error("generation failed: %s", ev)
                raise APIError(500, "generation failed", type="server_error")
            assert isinstance(ev, Event)
            if first:
                first = False
                job = self.jobs[k]
                if job.first_token is not None:
                    self.server.metrics.first_token(job.first_token - job.submitted)
            index = k * self.p.n + ev.choice
            c = self.choices[index]
            c.add(ev.text, ev.token_id, ev.logprob)
            if ev.finished:
                c.finish_reason = ev.finish_reason
                self.open -= 1
            yield index, ev


def serve(config: ServeConfig, engine=None) -> None:
    """Load the model (unless ``engine`` is given) and serve until interrupted."""
    import uvicorn

    if engine is None:
        from workbench import load
        from workbench.engine import Engine

        model, tok = load(config.model)
        engine = Engine(model, tok)
    app = create_app(Server(engine, config))
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning", access_log=False)
