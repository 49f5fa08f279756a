"""Multi-LoRA BGMV / SGMV kernels vs their torch references and exact (fp64) products. On a machine without CUDA
they run in Triton's CPU interpreter (TRITON_INTERPRET=1, set here before the first launch), so shapes are small
and odd."""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from workbench.kernels import lora  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
S, K, N = 3, 37, 53
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
UNIT = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# one rounding at the store: one u; the interpreter truncates fp32 -> bf16 instead of rounding, up to 2u
STORE_ULPS = {torch.float32: 1, torch.float16: 1, torch.bfloat16: 2 if DEV == "cpu" else 1}
IDX7 = [2, -1, 0, 2, 1, -1, 2]  # repeated slots and rows without an adapter


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every tensor the launchers allocate starts as NaN, so an element the kernel forgets shows up."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -777)

    monkeypatch.setattr(torch, "empty", empty)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def pools(r, dtype, seed=0):
    g = gen(seed)
    a = torch.randn(S, r, K, generator=g).to(DEV, dtype)
    bt = torch.randn(S, r, N, generator=g).to(DEV, dtype)
    return a, bt


def idx_for(R):
    return torch.tensor(IDX7[:R], device=DEV)


def assert_bound(out, exact, scale, ops, dtype):
    """``|out - exact| <= STORE_ULPS u |exact| + ops 2^-24 scale``: one rounding to ``dtype`` after fp32 sums of
    ``ops`` terms whose magnitudes add up to ``scale`` (an accumulation in bf16/fp16 is ~2^16 / 2^13 x off)."""
    assert out.dtype == dtype
    err = (out.double() - exact).abs()
    bound = STORE_ULPS[dtype] * UNIT[dtype] * exact.abs() + ops * 2.0**-24 * scale
    bad = err > bound  # exact zeros (rows without an adapter) must come out exactly zero
    assert not bool(bad.any()), f"{int(bad.sum())} elements off, worst by {float((err - bound).max()):.3g}"


def exact_shrink(x, a, idx):
    w = a[idx.clamp(min=0)].double() * (idx >= 0)[:, None, None]
    return (w @ x.double()[:, :, None])[..., 0], (w.abs() @ x.double().abs()[:, :, None])[..., 0]


def exact_expand(y, bt, idx, out0):
    w = bt[idx.clamp(min=0)].double() * (idx >= 0)[:, None, None]
    base = torch.zeros(y.shape[0], bt.shape[2], dtype=torch.float64, device=DEV) if out0 is None else out0.double()
    delta = (y.double()[:, None, :] @ w)[:, 0]
    return base + delta, base.abs() + (y.double().abs()[:, None, :] @ w.abs())[:, 0]


# -- BGMV -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r", [1, 5, 16])
@pytest.mark.parametrize("R", [1, 7])
def test_bgmv_shrink_vs_exact_and_reference(dtype, r, R):
    a, _ = pools(r, dtype)
    x = torch.randn(R, K, generator=gen(1)).to(DEV, dtype)
    idx = idx_for(R)
    y = lora.bgmv_shrink(x, a, idx, impl="triton")
    exact, terms = exact_shrink(x, a, idx)
    assert_bound(y, exact, terms, K, torch.float32)
    assert bool((y[idx < 0] == 0).all())
    torch.testing.assert_close(y, lora.bgmv_shrink_reference(x, a, idx), rtol=0, atol=K * 2.0**-24 * float(terms.max()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r", [1, 5, 16])
@pytest.mark.parametrize("R", [1, 7])
def test_bgmv_expand_in_place_and_new(dtype, r, R):
    _, bt = pools(r, dtype)
    g = gen(2)
    y = torch.randn(R, r, generator=g).to(DEV)
    idx = idx_for(R)
    out0 = torch.randn(R, N, generator=g).to(DEV, dtype)
    out = out0.clone()
    assert lora.bgmv_expand(y, bt, idx, out=out, impl="triton") is out
    assert_bound(out, *exact_expand(y, bt, idx, out0), r + 1, dtype)
    assert torch.equal(out[idx < 0], out0[idx < 0])  # no adapter: the row is left exactly as it was
    new = lora.bgmv_expand(y, bt, idx, impl="triton")
    assert_bound(new, *exact_expand(y, bt, idx, None), r, dtype)
    assert bool((new[idx < 0] == 0).all())
    ref = lora.bgmv_expand_reference(y, bt, idx, out0.clone())
    torch.testing.assert_close(out.float(), ref.float(), rtol=2 * UNIT[dtype], atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bgmv_expand_into_a_strided_column_slice(dtype):
    """``out`` as ``qkv[:, lo:hi]`` of a wider tensor: only those columns of the adapter rows change."""
    r, R = 5, 7
    _, bt = pools(r, dtype)
    g = gen(3)
    y = torch.randn(R, r, generator=g).to(DEV)
    idx = idx_for(R)
    wide = torch.randn(R, 2 * N + 11, generator=g).to(DEV, dtype)
    before = wide.clone()
    out = wide[:, 7:7 + N]
    assert out.stride() == (2 * N + 11, 1)
    lora.bgmv_expand(y, bt, idx, out=out, impl="triton")
    assert torch.equal(wide[:, :7], before[:, :7]) and torch.equal(wide[:, 7 + N:], before[:, 7 + N:])
    assert torch.equal(wide[idx < 0], before[idx < 0])
    assert_bound(wide[:, 7:7 + N], *exact_expand(y, bt, idx, before[:, 7:7 + N]), r + 1, dtype)
    with pytest.raises(ValueError, match="unit column stride"):
        lora.bgmv_expand(y, bt, idx, out=wide[:, 7:7 + 2 * N:2])


def test_shrink_then_expand_equals_a_python_loop_of_matmuls():
    r, R = 16, 7
    a, bt = pools(r, torch.float32, seed=4)
    g = gen(5)
    x = torch.randn(R, K, generator=g).to(DEV)
    out0 = torch.randn(R, N, generator=g).to(DEV)
    idx = idx_for(R)
    want = out0.double().clone()
    for i, s in enumerate(idx.tolist()):
        if s >= 0:
            want[i] += (a[s].double() @ x[i].double()) @ bt[s].double()
    got = lora.bgmv_expand(lora.bgmv_shrink(x, a, idx, impl="triton"), bt, idx, out=out0.clone(), impl="triton")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    order, starts, slots = lora.segments(idx)
    got_s = lora.sgmv_expand(lora.sgmv_shrink(x[order], a, starts, slots, impl="triton"), bt, starts, slots,
                             out=out0[order].clone(), impl="triton")
    torch.testing.assert_close(got_s.double(), want[order], rtol=1e-5, atol=1e-4)
    ref = lora.bgmv_expand_reference(lora.bgmv_shrink_reference(x, a, idx), bt, idx, out0.clone())
    torch.testing.assert_close(ref.double(), want, rtol=1e-5, atol=1e-4)


# -- SGMV -----------------------------------------------------------------------------------------------------

def test_segments_sorts_rows_stably_by_slot():
    idx = torch.tensor([2, -1, 0, 2, 1, -1, 2], device=DEV)
    order, starts, slots = lora.segments(idx)
    assert order.tolist() == [1, 5, 2, 4, 0, 3, 6]
    assert starts.tolist() == [0, 2, 3, 4, 7] and slots.tolist() == [-1, 0, 1, 2]
    assert starts.dtype == slots.dtype == torch.int64
    empty = lora.segments(torch.zeros(0, dtype=torch.int64, device=DEV))
    assert empty[0].numel() == 0 and empty[1].tolist() == [0] and empty[2].numel() == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r", [1, 5, 16])
def test_sgmv_equals_bgmv_on_the_same_rows(dtype, r):
    """Hand-built segments: one longer than a 32-row tile, an empty one, a -1 one, a slot used twice."""
    a, bt = pools(r, dtype, seed=6)
    lengths, slot_list = [0, 37, 3, 4, 9], [1, 2, -1, 0, 2]
    R = sum(lengths)
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEV)
    slots = torch.tensor(slot_list, device=DEV)
    idx = torch.repeat_interleave(slots, torch.tensor(lengths, device=DEV))
    g = gen(7)
    x = torch.randn(R, K, generator=g).to(DEV, dtype)
    out0 = torch.randn(R, N, generator=g).to(DEV, dtype)

    y = lora.sgmv_shrink(x, a, starts, slots, impl="triton")
    exact, terms = exact_shrink(x, a, idx)
    assert_bound(y, exact, terms, K, torch.float32)
    torch.testing.assert_close(y, lora.bgmv_shrink(x, a, idx, impl="triton"), rtol=0,
                               atol=2 * K * 2.0**-24 * float(terms.max()))
    out = lora.sgmv_expand(y, bt, starts, slots, out=out0.clone(), impl="triton")
    assert_bound(out, *exact_expand(y, bt, idx, out0), r + 1, dtype)
    assert torch.equal(out[idx < 0], out0[idx < 0])
    torch.testing.assert_close(out.float(), lora.bgmv_expand(y, bt, idx, out=out0.clone(), impl="triton").float(),
                               rtol=2 * UNIT[dtype], atol=1e-5)
    new = lora.sgmv_expand(y, bt, starts, slots, impl="triton")
    assert_bound(new, *exact_expand(y, bt, idx, None), r, dtype)
    torch.testing.assert_close(lora.sgmv_shrink_reference(x, a, starts, slots), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lora.sgmv_expand_reference(y, bt, starts, slots).float(), new.float(),
                               rtol=2 * UNIT[dtype], atol=1e-5)


def test_sgmv_expand_into_a_strided_column_slice():
    r = 5
    _, bt = pools(r, torch.float32)
    idx = torch.tensor([-1, 0, 0, 2, 2, 2], device=DEV)
    _, starts, slots = lora.segments(idx)
    g = gen(8)
    y = torch.randn(6, r, generator=g).to(DEV)
    wide = torch.randn(6, N + 20, generator=g).to(DEV)
    before = wide.clone()
    lora.sgmv_expand(y, bt, starts, slots, out=wide[:, 10:10 + N], impl="triton")
    assert torch.equal(wide[:, :10], before[:, :10]) and torch.equal(wide[:, 10 + N:], before[:, 10 + N:])
    assert torch.equal(wide[0], before[0])
    assert_bound(wide[:, 10:10 + N], *exact_expand(y, bt, idx, before[:, 10:10 + N]), r + 1, torch.float32)


# -- launchers ------------------------------------------------------------------------------------------------

def test_torch_impl_and_empty_batches():
    a, bt = pools(5, torch.float32)
    x, idx = torch.randn(7, K, generator=gen(9)).to(DEV), idx_for(7)
    assert torch.equal(lora.bgmv_shrink(x, a, idx, impl="torch"), lora.bgmv_shrink_reference(x, a, idx))
    assert lora.bgmv_shrink(x[:0], a, idx[:0], impl="triton").shape == (0, 5)
    assert lora.bgmv_expand(torch.zeros(0, 5, device=DEV), bt, idx[:0], impl="triton").shape == (0, N)
    starts = torch.zeros(1, dtype=torch.int64, device=DEV)
    assert lora.sgmv_shrink(x[:0], a, starts, idx[:0], impl="triton").shape == (0, 5)
    y = lora.bgmv_shrink(x, a, idx.to(torch.int32), impl="triton")  # any integer dtype for the slots
    assert torch.equal(y, lora.bgmv_shrink(x, a, idx, impl="triton"))


def test_bad_inputs():
    a, bt = pools(5, torch.float32)
    x, y, idx = torch.randn(7, K), torch.randn(7, 5), idx_for(7)
    starts, slots = torch.tensor([0, 3, 7]), torch.tensor([0, 1])
    cases = [
        (lambda: lora.bgmv_shrink(x[0], a, idx), "x must be \\[R, K\\]"),
        (lambda: lora.bgmv_shrink(x, a[0], idx), "a must be \\[S, r, K\\]"),
        (lambda: lora.bgmv_shrink(x[:, :-1], a, idx), "K=36 columns"),
        (lambda: lora.bgmv_shrink(x.half(), a, idx), "share a dtype"),
        (lambda: lora.bgmv_shrink(x.double(), a.double(), idx), "unsupported"),
        (lambda: lora.bgmv_shrink(x, a, idx.float()), "idx must be an integer"),
        (lambda: lora.bgmv_shrink(x, a, idx[:3]), "idx must have 7 entries"),
        (lambda: lora.bgmv_shrink(x, a, idx + 1), "must be in \\[-1, 3\\)"),
        (lambda: lora.bgmv_shrink(x, a, idx - 1), "must be in \\[-1, 3\\)"),
        (lambda: lora.bgmv_shrink(x.to("meta"), a, idx), "one device"),
        (lambda: lora.bgmv_expand(y[:, :4], bt, idx), "r=4 columns"),
        (lambda: lora.bgmv_expand(y, bt, idx, out=torch.zeros(7, N + 1)), "out must be \\[R, N\\]"),
        (lambda: lora.bgmv_expand(y, bt, idx, out=torch.zeros(7, N).half()), "out and bt must share"),
        (lambda: lora.bgmv_expand(y, bt, idx, out=torch.zeros(1, N).expand(7, N)), "rows must not overlap"),
        (lambda: lora.sgmv_shrink(x, a, torch.tensor([0, 3, 6]), slots), "from 0 to R=7"),
        (lambda: lora.sgmv_shrink(x, a, torch.tensor([1, 3, 7]), slots), "from 0 to R=7"),
        (lambda: lora.sgmv_shrink(x, a, torch.tensor([0, 5, 3, 7]), torch.tensor([0, 1, 2])), "non-decreasing"),
        (lambda: lora.sgmv_shrink(x, a, starts, torch.tensor([0])), "seg_slots must have 2 entries"),
        (lambda: lora.sgmv_shrink(x, a, starts, torch.tensor([0, 3])), "seg_slots must be in \\[-1, 3\\)"),
        (lambda: lora.sgmv_shrink(x, a, starts.float(), slots), "seg_starts must be an integer"),
        (lambda: lora.sgmv_expand(y, bt, starts, slots, out=torch.zeros(7, 2 * N)[:, ::2]), "unit column"),
        (lambda: lora.segments(idx[None]), "idx must be 1-D"),
        (lambda: lora.bgmv_shrink(x, a, idx, impl="cuda"), "impl must be one of"),
    ]
    for fn, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fn()
    with pytest.raises(ValueError, match="must be in"):  # the references check the same way
        lora.bgmv_expand_reference(y, bt, idx + 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, run the benchmark itself")
def test_benchmark_lora_section_smoke():
    """The benchmark's LoRA section (check against the torch loop over adapters, timing, GB/s) on tiny shapes."""
    from conftest import REPO

    sys.path.insert(0, str(REPO / "experiments"))
    try:
        import bench_kernels
    finally:
        sys.path.pop(0)
    rows = bench_kernels.bench_lora("cpu", bench_kernels.timer(True), True)
    assert [r["kernel"] for r in rows] == ["bgmv shrink+expand"] and rows[0]["triton_GBps"] > 0
