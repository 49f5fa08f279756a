"""Continuous batching: requests that join and leave a running batch get exactly the tokens they get alone."""

from __future__ import annotations

import threading

import pytest
import torch

from workbench.engine import Engine
from workbench.engine.config import GREEDY, GenerationConfig, SamplingParams
from workbench.serve.scheduler import Job, Scheduler


def _collect(job_events, done, key):
    def emit(ev):
        if isinstance(ev, BaseException):
            job_events[key] = ev
            done[key].set()
            return
        job_events.setdefault(key, {}).setdefault(ev.choice, []).append(ev)
        if ev.finished and all(evs and evs[-1].finished for evs in job_events[key].values()) and \
                len(job_events[key]) == n_choices[key]:
            done[key].set()
    return emit


n_choices: dict = {}


def _tokens(evs):
    return [e.token_id for e in evs if e.token_id is not None]


def _run_staggered(engine, specs, *, max_batch=16):
    """specs: (prompt, config, n, after): submitted once job ``after`` has streamed 3 tokens (None: at once)."""
    events, done = {}, {i: threading.Event() for i in range(len(specs))}
    sched = Scheduler(engine, max_batch=max_batch).start()
    jobs = {}
    followers: dict = {}
    for i, (_, _, _, after) in enumerate(specs):
        followers.setdefault(after, []).append(i)

    def make(i):
        prompt, cfg, n, _ = specs[i]
        n_choices[(id(events), i)] = n
        inner = _collect(events, {**done, (id(events), i): done[i]}, (id(events), i))
        count = [0]

        def emit(ev):
            inner(ev)
            count[0] += 1
            if count[0] == 3:
                for j in followers.get(i, []):
                    submit(j)
        return Job(engine.encode(prompt), cfg, emit, n=n)

    def submit(i):
        jobs[i] = make(i)
        sched.submit(jobs[i])

    try:
        for i in followers.get(None, []):
            submit(i)
        for i in range(len(specs)):
            assert done[i].wait(120), f"job {i} did not finish"
    finally:
        sched.close()
    return [events[(id(events), i)] for i in range(len(specs))]


PROMPTS = ["hello there", "a", "The quick brown fox jumps over", "zz top", "0123456789 abc", "x y z w"]


@pytest.mark.parametrize("backend", ["hf", "packed-llama"])
def test_joining_requests_get_their_solo_tokens(tiny_llama, backend):
    model, tok = tiny_llama
    engine = Engine(model, tok, backend=backend)
    cfgs = [GenerationConfig(max_new_tokens=m, sampling=GREEDY, ignore_eos=True) for m in (12, 5, 9, 14, 7, 10)]
    sampled = GenerationConfig(max_new_tokens=11, sampling=SamplingParams(temperature=0.9, top_p=0.9), seed=7,
                               ignore_eos=True)
    # 0 starts alone; 1 and 2 join it later; 3 joins 2; 4 (sampled, seeded) joins 1 (which leaves early); 5 joins 3
    specs = [(PROMPTS[0], cfgs[0], 1, None), (PROMPTS[1], cfgs[1], 1, 0), (PROMPTS[2], cfgs[2], 1, 0),
             (PROMPTS[3], cfgs[3], 1, 2), (PROMPTS[4], sampled, 1, 1), (PROMPTS[5], cfgs[5], 1, 3)]
    got = _run_staggered(engine, specs)
    for (prompt, cfg, _, _), ev in zip(specs, got, strict=True):
        alone = engine.generate([prompt], cfg)[0]
        assert _tokens(ev[0]) == alone.token_ids, prompt
        assert "".join(e.text for e in ev[0]) == alone.text


def test_batch_of_eight_equals_alone_and_n_choices(tiny_llama):
    model, tok = tiny_llama
    engine = Engine(model, tok)
    cfg = GenerationConfig(max_new_tokens=8, sampling=SamplingParams(temperature=1.0), seed=3, ignore_eos=True)
    specs = [(PROMPTS[i % len(PROMPTS)] + str(i), cfg, 1, None) for i in range(8)]
    specs.append((PROMPTS[0], cfg, 3, None))  # n = 3: choice c is seeded seed + c
    got = _run_staggered(engine, specs)
    for (prompt, c, n, _), ev in zip(specs, got, strict=True):
        for choice in range(n):
            alone = engine.generate([prompt], GenerationConfig(max_new_tokens=8, sampling=c.sampling,
                                                               seed=c.seed + choice, ignore_eos=True))[0]
            assert _tokens(ev[choice]) == alone.token_ids
    n3 = got[-1]
    assert len({tuple(_tokens(n3[c])) for c in range(3)}) > 1  # the choices differ


def test_cancelled_job_frees_its_row(tiny_llama):
    model, tok = tiny_llama
    engine = Engine(model, tok)
    sched = Scheduler(engine, max_batch=1, max_queue=4).start()
    got = []
    second_done = threading.Event()
    try:
        long = Job(engine.encode("abc"), GenerationConfig(max_new_tokens=10_000, ignore_eos=True),
                   lambda ev: got.append(ev), n=1)
        sched.submit(long)
        short = Job(engine.encode("def"), GenerationConfig(max_new_tokens=3, ignore_eos=True),
                    lambda ev: second_done.set() if getattr(ev, "finished", False) else None)
        sched.submit(short)  # waits: the batch holds one row
        assert not second_done.wait(1.0)
        long.cancel()
        assert second_done.wait(30), "the cancelled job kept its row"
        n = len(got)
        assert n < 10_000
    finally:
        sched.close()


def test_queue_bound(tiny_llama):
    from workbench.serve.scheduler import QueueFull

    model, tok = tiny_llama
    engine = Engine(model, tok)
    sched = Scheduler(engine, max_batch=1, max_queue=1)  # not started: nothing leaves the queue
    sched.submit(Job([1, 2], GenerationConfig(), lambda ev: None))
    with pytest.raises(QueueFull):
        sched.submit(Job([1, 2], GenerationConfig(), lambda ev: None))


@pytest.mark.parametrize("backend", ["hf", "packed-llama"])
def test_regroup_keeps_rows_exact(tiny_llama, backend):
    """Session.regroup: rows kept and rows admitted continue exactly as they would alone."""
    model, tok = tiny_llama
    engine = Engine(model, tok, backend=backend)
    with torch.inference_mode():
        a = engine.start([[5, 6, 7, 8, 9], [10, 11]], 6)
        a.decode(torch.tensor([3, 4]))
        b = engine.start([[20, 21, 22, 23, 24, 25, 26, 27]], 0)
        a.regroup([1], b, extra=4)
        both = a.decode(torch.tensor([12, 28]))
        alone1 = engine.start([[10, 11, 4]], 1).decode(torch.tensor([12]))
        alone2 = engine.start([[20, 21, 22, 23, 24, 25, 26, 27]], 1).decode(torch.tensor([28]))
    torch.testing.assert_close(both[0], alone1[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[1], alone2[0], rtol=1e-5, atol=1e-5)
    assert a.B == 2 and a.capacity == 8 + 4
