"""The OpenAI-compatible server, driven by the real openai client (tiny model), raw httpx for bad input, and a
real redis-server for the cache."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

import httpx
import pytest
import torch
from serve_util import LiveServer, redis_server

from workbench.engine import Engine
from workbench.engine.config import GREEDY, GenerationConfig, SamplingParams
from workbench.serve import ServeConfig, Server, create_app
from workbench.serve.cache import cache_key

openai = pytest.importorskip("openai")
MODEL = "tiny-llama"
MESSAGES = [{"role": "user", "content": "Say something."}]


def chat_ids(tok, messages=MESSAGES):
    from workbench.chat import prompt_ids

    return prompt_ids(tok, messages)


@pytest.fixture(scope="module")
def engine():
    from workbench.models.tiny import build_tiny

    model, tok = build_tiny("llama")
    return Engine(model, tok)


def start(engine, **kw):
    kw.setdefault("default_max_tokens", 16)
    return LiveServer(create_app(Server(engine, ServeConfig(model=MODEL, **kw))))


@pytest.fixture(scope="module")
def live(engine):
    with start(engine) as s:
        yield s


def client(live, **kw):
    return openai.OpenAI(base_url=live.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)


def offline(engine, ids, **kw):
    kw.setdefault("sampling", GREEDY)
    return engine.generate([ids], GenerationConfig(**kw))[0]


# -- the openai client ----------------------------------------------------------------------------

def test_models_and_health(live):
    c = client(live)
    assert [m.id for m in c.models.list().data] == [MODEL]
    assert httpx.get(live.url + "/health").json()["status"] == "ok"


def test_chat_greedy_equals_offline_engine(live, engine):
    r = client(live).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    ref = offline(engine, chat_ids(engine.tokenizer), max_new_tokens=12)
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.prompt_tokens == len(chat_ids(engine.tokenizer))
    assert r.choices[0].finish_reason == ("length" if ref.finish_reason == "length" else "stop")


def test_completion_seeded_sampling_equals_offline(live, engine):
    r = client(live).completions.create(model=MODEL, prompt="Once upon", max_tokens=10, temperature=0.8,
                                        top_p=0.9, seed=11)
    ref = offline(engine, engine.encode("Once upon"), max_new_tokens=10,
                  sampling=SamplingParams(temperature=0.8, top_p=0.9), seed=11)
    assert r.choices[0].text == ref.text
    assert r.object == "text_completion"


def test_n_choices_and_stop(live, engine):
    c = client(live)
    r = c.completions.create(model=MODEL, prompt="abc", max_tokens=8, temperature=1.0, seed=5, n=3)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    for i, ch in enumerate(r.choices):
        ref = offline(engine, engine.encode("abc"), max_new_tokens=8, sampling=SamplingParams(temperature=1.0),
                      seed=5 + i)
        assert ch.text == ref.text
    assert len({ch.text for ch in r.choices}) > 1
    assert r.usage.completion_tokens == 3 * 8
    full = c.completions.create(model=MODEL, prompt="abc", max_tokens=12, temperature=0).choices[0].text
    stop = full[3:5]
    cut = c.completions.create(model=MODEL, prompt="abc", max_tokens=12, temperature=0, stop=[stop]).choices[0]
    assert cut.text == full[: full.find(stop)] and cut.finish_reason == "stop"


def test_logprobs_match_engine(live, engine):
    c = client(live)
    r = c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True,
                                  top_logprobs=3)
    ref = offline(engine, chat_ids(engine.tokenizer), max_new_tokens=6, logprobs=3)
    got = r.choices[0].logprobs.content
    assert len(got) == len(ref.logprobs)
    for g, w in zip(got, ref.logprobs, strict=True):
        assert g.logprob == pytest.approx(w.logprob, abs=1e-5)
        assert [t.logprob for t in g.top_logprobs] == pytest.approx([lp for _, lp in w.top], abs=1e-5)
        assert g.token == engine.tokenizer.decode([w.token_id])
    cr = c.completions.create(model=MODEL, prompt="abc", max_tokens=5, temperature=0, logprobs=2)
    lp = cr.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(len(t) <= 2 for t in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and "".join(lp.tokens) == cr.choices[0].text


def test_streaming_shape(live, engine):
    c = client(live)
    chunks = list(c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    ref = offline(engine, chat_ids(engine.tokenizer), max_new_tokens=10)
    assert text == ref.text
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finals) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.token_ids)
    raw = httpx.post(live.url + "/v1/completions", json={"model": MODEL, "prompt": "abc", "max_tokens": 4,
                                                         "temperature": 0, "stream": True}).text
    events = [e for e in raw.split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_json_schema_response_format(live):
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "blue"]}}, "required": ["color"],
              "additionalProperties": False}
    r = client(live).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
    assert json.loads(r.choices[0].message.content)["color"] in ("red", "blue")


def test_async_client_concurrent(live, engine):
    async def main():
        ac = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0)
        prompts = [f"prompt {i}" for i in range(8)]
        rs = await asyncio.gather(*[ac.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0)
                                    for p in prompts])
        await ac.close()
        return prompts, rs

    prompts, rs = asyncio.run(main())
    for p, r in zip(prompts, rs, strict=True):
        assert r.choices[0].text == offline(engine, engine.encode(p), max_new_tokens=8).text


def test_embeddings(live):
    c = client(live)
    r = c.embeddings.create(model=MODEL, input=["red apples", "green pears"])  # the client asks for base64
    v = torch.tensor([d.embedding for d in r.data])
    assert v.shape == (2, 64)
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(2))
    short = c.embeddings.create(model=MODEL, input="red apples", dimensions=16).data[0].embedding
    want = torch.nn.functional.normalize(v[0, :16], dim=0)
    torch.testing.assert_close(torch.tensor(short), want, rtol=1e-5, atol=1e-6)
    assert r.usage.prompt_tokens == len("red apples") + len("green pears")  # byte tokenizer


# -- bad input --------------------------------------------------------------------------------------

BAD = [
    ({"model": MODEL, "prompt": "a", "temperature": -0.5}, "temperature"),
    ({"model": MODEL, "prompt": "a", "n": 0}, "n"),
    ({"model": MODEL, "prompt": "a", "n": 100}, "n"),
    ({"model": "gpt-4o", "prompt": "a"}, "model"),
    ({"model": MODEL, "prompt": "a", "response_format": {"type": "json_schema",
                                                       "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format"),
    ({"model": MODEL, "prompt": "a" * 5000}, "prompt"),
    ({"model": MODEL, "prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL, "prompt": "a", "stop": 3}, "stop"),
    ({"model": MODEL, "prompt": "a", "logit_bias": {"999999": 1}}, "logit_bias"),
    ({"model": MODEL, "prompt": "a", "strategy": "magic"}, "strategy"),
    ({"model": MODEL, "prompt": ""}, "prompt"),
]


@pytest.mark.parametrize("body,param", BAD, ids=[p for _, p in BAD])
def test_bad_requests_get_openai_errors(live, body, param):
    r = httpx.post(live.url + "/v1/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
    assert "Traceback" not in r.text


def test_malformed_json_unknown_route_and_server_keeps_serving(live):
    r = httpx.post(live.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(live.url + "/v1/chat/completions", json={"model": MODEL, "messages": "hi"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.get(live.url + "/v2/nothing")
    assert r.status_code == 404 and "error" in r.json()
    ok = httpx.post(live.url + "/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 2})
    assert ok.status_code == 200


def test_openai_client_raises_typed_errors(live):
    with pytest.raises(openai.BadRequestError):
        client(live).chat.completions.create(model=MODEL, messages=MESSAGES, temperature=5)


def test_api_key(engine):
    with start(engine, api_key="sekrit") as s:
        assert httpx.get(s.url + "/v1/models").status_code == 401
        r = httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(s.url + "/health").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            client(s, api_key="wrong").models.list()
        assert client(s, api_key="sekrit").models.list().data[0].id == MODEL


def test_queue_full_is_429_and_disconnect_frees_the_slot(engine):
    app_server = Server(engine, ServeConfig(model=MODEL, max_batch=1, max_queue=0, context=20_000))
    with LiveServer(create_app(app_server)) as s:
        body = {"model": MODEL, "prompt": "abc", "max_tokens": 19_000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=30) as resp:
            assert resp.status_code == 200
            it = resp.iter_lines()
            next(it)  # generation is running: the one batch row is taken
            deadline = time.monotonic() + 10
            while app_server.scheduler.batch_size == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            r = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
            assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
        # the client went away: its row is freed at the next step
        deadline = time.monotonic() + 20
        while app_server.scheduler.batch_size and time.monotonic() < deadline:
            time.sleep(0.05)
        assert app_server.scheduler.batch_size == 0
        r = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200


def test_metrics_text(live):
    client(live).completions.create(model=MODEL, prompt="m", max_tokens=3, temperature=0)
    text = httpx.get(live.url + "/metrics").text
    for name in ("daert_requests_total", "daert_completion_tokens_total", "daert_queue_depth", "daert_batch_size",
                 "daert_time_to_first_token_seconds_bucket", "daert_cache_hits_total", "daert_cache_misses_total"):
        assert name in text
    assert 'daert_requests_total{endpoint="/v1/completions",status="200"}' in text


# -- the Redis cache --------------------------------------------------------------------------------

def _metric(url, name) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def test_cache_key_covers_every_parameter():
    base = {"kind": "chat", "prompts": [[1, 2]], "n": 1, "max_tokens": 8, "logprobs": None,
            "sampling": {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "typical_p": 1.0,
                         "repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0},
            "logit_bias": [], "stop": [], "seed": None, "response_format": None, "ignore_eos": False,
            "strategy": "sample"}
    ident = {"name": "m", "weights": "abc", "offsets": {}, "hooks": []}
    k0 = cache_key(ident, base)
    variants = [dict(base, prompts=[[1, 3]]), dict(base, n=2), dict(base, max_tokens=9), dict(base, logprobs=0),
                dict(base, logit_bias=[(5, 1.0)]), dict(base, stop=["x"]), dict(base, seed=1),
                dict(base, response_format={"type": "json_object"}), dict(base, ignore_eos=True),
                dict(base, strategy="speculative"), dict(base, kind="completion")]
    for field in base["sampling"]:
        variants.append(dict(base, sampling=dict(base["sampling"], **{field: 0.5})))
    keys = {cache_key(ident, v) for v in variants}
    assert k0 not in keys and len(keys) == len(variants)
    for field, value in (("weights", "abd"), ("name", "n"), ("offsets", {"blocks.1.hook_resid_post": "x"}),
                         ("hooks", ["h"])):
        assert cache_key(dict(ident, **{field: value}), base) != k0


def test_cache_hits_identical_outputs_and_survives_restart(engine):
    with redis_server() as redis:
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 10, "temperature": 0, "logprobs": True,
                "top_logprobs": 2}
        with start(engine) as plain:
            uncached = httpx.post(plain.url + "/v1/chat/completions", json=body).json()
        with start(engine, cache_url=redis.url) as s:
            first = httpx.post(s.url + "/v1/chat/completions", json=body).json()
            second = httpx.post(s.url + "/v1/chat/completions", json=body).json()
            assert _metric(s.url, "daert_cache_hits_total") == 1
            assert _metric(s.url, "daert_cache_misses_total") == 1
            for r in (first, second):
                assert r["choices"] == uncached["choices"] and r["usage"] == uncached["usage"]
            # streaming replays from the cache: same text, same chunk count as a live stream
            sbody = dict(body, stream=True)
            live_stream = httpx.post(s.url + "/v1/chat/completions", json=dict(sbody, max_tokens=11)).text  # a miss
            replay = httpx.post(s.url + "/v1/chat/completions", json=dict(sbody, max_tokens=11)).text
            assert _metric(s.url, "daert_cache_hits_total") == 2

            def content(raw):
                out = []
                for e in raw.split("\n\n"):
                    if e.startswith("data: {"):
                        out.append([(c.get("delta"), c.get("finish_reason"), c.get("logprobs"))
                                    for c in json.loads(e[6:])["choices"]])
                return out
            assert content(live_stream) == content(replay)
            # sampling without a seed is never cached
            rnd = dict(body, temperature=1.0)
            httpx.post(s.url + "/v1/chat/completions", json=rnd)
            httpx.post(s.url + "/v1/chat/completions", json=rnd)
            assert _metric(s.url, "daert_cache_hits_total") == 2
        with start(engine, cache_url=redis.url) as again:  # a restarted server keeps the cache
            r = httpx.post(again.url + "/v1/chat/completions", json=body).json()
            assert _metric(again.url, "daert_cache_hits_total") == 1 and r["choices"] == uncached["choices"]


def test_weight_edit_misses_the_cache(engine):
    with redis_server() as redis, start(engine, cache_url=redis.url) as s:
        body = {"model": MODEL, "prompt": "edit me", "max_tokens": 6, "temperature": 0}
        before = httpx.post(s.url + "/v1/completions", json=body).json()
        w = engine.model.model.layers[0].mlp.down_proj.weight
        saved = w.detach().clone()
        try:
            with torch.no_grad():
                w.mul_(3.0)
            after = httpx.post(s.url + "/v1/completions", json=body).json()
            assert _metric(s.url, "daert_cache_hits_total") == 0
            assert after["system_fingerprint"] != before["system_fingerprint"]
        finally:
            with torch.no_grad():
                w.copy_(saved)
        again = httpx.post(s.url + "/v1/completions", json=body).json()
        assert _metric(s.url, "daert_cache_hits_total") == 1 and again["choices"] == before["choices"]


def test_redis_going_away_serves_uncached(engine, caplog):
    with redis_server() as redis, start(engine, cache_url=redis.url) as s:
        body = {"model": MODEL, "prompt": "outage", "max_tokens": 6, "temperature": 0}
        ok = httpx.post(s.url + "/v1/completions", json=body).json()
        redis.stop()
        with caplog.at_level(logging.WARNING, logger="workbench.serve.cache"):
            results = [httpx.post(s.url + "/v1/completions", json=body, timeout=30) for _ in range(3)]
        assert all(r.status_code == 200 and r.json()["choices"] == ok["choices"] for r in results)
        assert any("unavailable" in rec.message for rec in caplog.records)
        assert _metric(s.url, "daert_cache_errors_total") >= 3


def test_streams_in_flight_during_a_cache_outage(engine):
    """Concurrent streams keep going while Redis disappears under them."""
    with redis_server() as redis, start(engine, cache_url=redis.url) as s:
        bodies = [{"model": MODEL, "prompt": f"p{i}", "max_tokens": 30, "temperature": 0, "stream": True}
                  for i in range(4)]
        out = [None] * 4

        def run(i):
            out[i] = httpx.post(s.url + "/v1/completions", json=bodies[i], timeout=60)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        redis.stop()
        for t in threads:
            t.join()
        assert all(r.status_code == 200 and r.text.endswith("data: [DONE]\n\n") for r in out)


def test_cache_ttl_and_entry_size(engine):
    with redis_server() as redis:
        body = {"model": MODEL, "prompt": "ttl", "max_tokens": 4, "temperature": 0}
        with start(engine, cache_url=redis.url, cache_ttl_s=1) as s:
            httpx.post(s.url + "/v1/completions", json=body)
            httpx.post(s.url + "/v1/completions", json=body)
            assert _metric(s.url, "daert_cache_hits_total") == 1
            time.sleep(1.5)  # the entry expired
            httpx.post(s.url + "/v1/completions", json=body)
            assert _metric(s.url, "daert_cache_hits_total") == 1
        with start(engine, cache_url=redis.url, cache_max_entry_bytes=16) as s:  # every response is bigger
            for _ in range(2):
                assert httpx.post(s.url + "/v1/completions", json=dict(body, prompt="big")).status_code == 200
            assert _metric(s.url, "daert_cache_hits_total") == 0
