"""Thread counts: per-phase defaults from the physical cores, and blocks that restore in any order across threads."""

import threading

import pytest
import torch

import workbench.threads as threads
from workbench.cpu import physical_cores
from workbench.threads import DEFAULT_POLICY, ThreadPolicy, num_threads


class _ProcessCount:
    """Stands in for torch's thread count as one process-wide value, whichever thread sets it."""

    def __init__(self, n):
        self.n = n

    def get_num_threads(self):
        return self.n

    def set_num_threads(self, n):
        self.n = n


def test_blocks_interleaved_across_threads(monkeypatch):
    count = _ProcessCount(5)
    monkeypatch.setattr(threads, "torch", count)
    a_in, b_in, a_may_exit, b_may_exit = (threading.Event() for _ in range(4))

    def a():
        with num_threads(1):
            a_in.set()
            a_may_exit.wait(10)

    def b():
        a_in.wait(10)
        with num_threads(3):
            b_in.set()
            b_may_exit.wait(10)

    ta, tb = threading.Thread(target=a), threading.Thread(target=b)
    ta.start(), tb.start()
    try:
        assert b_in.wait(10)
        assert count.n == 3
        a_may_exit.set()
        ta.join(10)
        assert count.n == 3  # B is still open: A's exit must not restore the count from before A
    finally:
        a_may_exit.set(), b_may_exit.set()
        ta.join(10), tb.join(10)
    assert count.n == 5


def test_nested_blocks(monkeypatch):
    count = _ProcessCount(4)
    monkeypatch.setattr(threads, "torch", count)
    with num_threads(2):
        with num_threads(1):
            assert count.n == 1
        assert count.n == 2
        with num_threads(None):
            assert count.n == 2
    assert count.n == 4


def test_restored_after_exception():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), num_threads(1):
        assert torch.get_num_threads() == 1
        raise RuntimeError
    assert torch.get_num_threads() == before


def test_invalid_count():
    with pytest.raises(ValueError), num_threads(0):
        pass


def test_policy_defaults_to_physical_cores():
    assert ThreadPolicy() == ThreadPolicy(prefill=physical_cores(), decode=physical_cores())
    assert threads.resolve(DEFAULT_POLICY) == ThreadPolicy()
    assert threads.resolve(None) is None and threads.resolve(ThreadPolicy(1, 2)) == ThreadPolicy(1, 2)
    with pytest.raises(TypeError):
        threads.resolve(2)
    p = ThreadPolicy(prefill=1, decode=2)
    assert (p.prefill, p.decode) == (1, 2)


@pytest.mark.parametrize("kwargs", [{"prefill": 0}, {"decode": 0}, {"prefill": -1, "decode": 2}])
def test_policy_rejects_counts_below_one(kwargs):
    with pytest.raises(ValueError):
        ThreadPolicy(**kwargs)


def test_engine_defaults_to_physical_cores_and_concurrent_calls_restore_the_count():
    """Two generation calls on worker threads with different policies leave torch's count as it was."""
    from workbench.engine import Engine, GenerationConfig
    from workbench.models.tiny import build_tiny

    model, tok = build_tiny("llama")
    assert Engine(model, tok).threads == ThreadPolicy()
    before = torch.get_num_threads()
    engines = [Engine(model, tok, threads=ThreadPolicy(1, 1)), Engine(model, tok, threads=ThreadPolicy(2, 3))]
    errors = []

    def work(eng):
        try:
            for _ in range(3):
                eng.generate(["hello"], GenerationConfig(max_new_tokens=8))
        except Exception as e:  # surfaced below
            errors.append(e)
    workers = [threading.Thread(target=work, args=(e,)) for e in engines]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors and torch.get_num_threads() == before and not threads._active
