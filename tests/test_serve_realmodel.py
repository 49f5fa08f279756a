"""The server on SmolLM2: batch-invariant greedy outputs, and 50 concurrent streaming clients."""

from __future__ import annotations

import asyncio
import statistics

import pytest
from serve_load import run_clients
from serve_util import LiveServer

from workbench.chat import prompt_ids
from workbench.engine import Engine
from workbench.engine.config import GREEDY, GenerationConfig
from workbench.serve import ServeConfig, Server, create_app

NAME = "smollm2-135m-instruct"
QUESTIONS = [
    "What is the capital of France?", "Name three colours.", "Why is the sky blue?", "What is 12 times 7?",
    "Write a haiku about rain.", "Who wrote Hamlet?", "What do bees make?", "Give me a synonym for happy.",
    "What is the boiling point of water?", "Describe a cat in one sentence.",
]


@pytest.fixture
def served(smollm2):
    model, tok = smollm2
    engine = Engine(model, tok)
    with LiveServer(create_app(Server(engine, ServeConfig(model=NAME, max_batch=16, max_queue=64)))) as s:
        yield s, engine


def offline(engine, questions, max_tokens):
    ids = [prompt_ids(engine.tokenizer, [{"role": "user", "content": q}]) for q in questions]
    return engine.generate(ids, GenerationConfig(max_new_tokens=max_tokens, sampling=GREEDY))


@pytest.mark.realmodel
def test_alone_and_among_seven_others_same_tokens(served):
    s, engine = served
    target = QUESTIONS[0]
    alone = asyncio.run(run_clients(s.url, NAME, [target], concurrency=1, max_tokens=24))[0]
    crowd = asyncio.run(run_clients(s.url, NAME, [target] + QUESTIONS[1:8], concurrency=8, max_tokens=24))
    assert alone.ok and all(r.ok for r in crowd)
    assert crowd[0].text == alone.text
    want = offline(engine, QUESTIONS[:8], 24)
    assert [r.text for r in crowd] == [w.text for w in want]
    assert [r.usage_tokens for r in crowd] == [len(w.token_ids) for w in want]
    assert alone.text == offline(engine, [target], 24)[0].text


@pytest.mark.realmodel
@pytest.mark.slow
def test_fifty_concurrent_streaming_clients(served):
    s, engine = served
    prompts = [QUESTIONS[i % len(QUESTIONS)] for i in range(50)]
    results = asyncio.run(run_clients(s.url, NAME, prompts, concurrency=50, max_tokens=16))
    want = dict(zip(QUESTIONS, offline(engine, QUESTIONS, 16), strict=True))
    assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
    for r in results:
        assert r.text == want[r.prompt].text  # no lost, duplicated or foreign tokens
        assert r.usage_tokens == len(want[r.prompt].token_ids)
    ttft = sorted(r.ttft for r in results)
    wall = max(r.end for r in results) - min(r.start for r in results)
    print(f"50 clients: TTFT p50 {statistics.median(ttft):.2f} s, p95 {ttft[int(0.95 * len(ttft)) - 1]:.2f} s, "
          f"{sum(r.tokens for r in results) / wall:.1f} tok/s aggregate")
