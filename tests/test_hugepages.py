"""Weight copies in one huge-page arena: same values, shapes and dtypes, each on a cache line; the packed
backend streams them and still computes what the model computes."""

import mmap

import pytest
import torch

from workbench.engine import hugepages
from workbench.engine.backends import PackedLlamaBackend
from workbench.models.tiny import build_tiny


def _sources():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(7, 5, generator=g), torch.randint(-128, 127, (3, 33), generator=g, dtype=torch.int8),
            torch.randn(4, generator=g).half(), torch.randint(0, 255, (2, 24), generator=g, dtype=torch.uint8)]


def test_copies_equal_their_sources_and_start_on_cache_lines():
    src = _sources()
    out, advised = hugepages.copies(src)
    assert advised == hugepages.available()
    for a, b in zip(src, out, strict=True):
        assert b.dtype == a.dtype and b.shape == a.shape and b.is_contiguous() and torch.equal(a, b)
        assert b.data_ptr() % hugepages.ALIGN == 0 and b.data_ptr() != a.data_ptr()
    if advised:  # one arena, starting on a huge-page boundary
        assert out[0].data_ptr() % hugepages.PAGE == 0
        assert out[-1].data_ptr() - out[0].data_ptr() < hugepages.PAGE
    out[0].add_(1)  # the copies are writable and independent of the sources
    assert not torch.equal(out[0], src[0])


def test_copies_outlive_every_python_reference_but_their_own():
    out, _ = hugepages.copies([torch.arange(1000, dtype=torch.float32)])
    keep = out[0][10:20]
    del out
    import gc

    gc.collect()
    assert torch.equal(keep, torch.arange(10, 20, dtype=torch.float32))


def test_switched_off_gives_ordinary_memory(monkeypatch):
    monkeypatch.setenv("DAERT_NO_HUGEPAGES", "1")
    assert not hugepages.available()
    out, advised = hugepages.copies(_sources())
    assert advised is False and all(torch.equal(a, b) for a, b in zip(_sources(), out, strict=True))


def test_refusals_and_empty_input():
    assert hugepages.copies([]) == ([], False)
    with pytest.raises(ValueError, match="CPU tensors"):
        hugepages.copies([torch.empty(3, device="meta")])


@pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="no MADV_HUGEPAGE on this OS")
@pytest.mark.parametrize("weights", ["fp32", "fp16", "int8", "q4"])
def test_packed_backend_streams_arena_copies_with_unchanged_logits(monkeypatch, weights):
    model, _ = build_tiny("llama")
    ids = torch.randint(5, 250, (2, 3), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    logits = {}
    for off in ("1", "0"):
        monkeypatch.setenv("DAERT_NO_HUGEPAGES", off)
        b = PackedLlamaBackend(model, weights=weights)
        assert b.huge_pages == (off == "0")
        streamed = b._q_args[0] if b._q_args is not None else [ly.wqkv for ly in b.layers]
        base = streamed[0].data_ptr()
        if off == "0":
            assert base % hugepages.PAGE == 0  # the first streamed matrix opens the arena
        c = b.new_cache(2, 8)
        logits[off] = b.forward(ids, mask, torch.arange(3).expand(2, 3), c)
    assert torch.equal(logits["1"], logits["0"])
