"""Multi-LoRA: many adapters in one batch, each row using its own low-rank update ``x A^T B^T``.

The batched gather matrix-vector (BGMV, decode: any slot per row) and segmented gather matrix-multiply
(SGMV, prefill: contiguous segments of rows sharing a slot) kernels of Chen et al. 2023, "Punica: Multi-Tenant
LoRA Serving", as served from a unified adapter pool in Sheng et al. 2023, "S-LoRA". Each is split into a
shrink (``y = x A^T``, ``[R, K] -> [R, r]``) and an expand (``out += y B^T``, ``[R, r] -> [R, N]``), so one
shrink can feed several outputs and an expand can add straight into a slice of a fused projection.

Pool layout (built elsewhere): ``a`` is ``[S, r, K]``, slot ``s`` holding adapter ``s``'s A (rows beyond its
rank are zero); ``bt`` is ``[S, r, N]``, slot ``s`` holding its B transposed with the LoRA scaling folded in.
``idx`` ``[R]`` gives each row's slot; ``-1`` means no adapter (shrink gives zeros, expand adds nothing).
Pools and activations are float32, bfloat16 or float16; products are accumulated in fp32, shrink outputs are
fp32 and expand rounds once, at the store (after adding to ``out`` in fp32).
The launchers check index ranges and segment boundaries on the tensors themselves, which synchronises a GPU.
"""

from __future__ import annotations

import functools

import torch

from workbench.kernels._launch import check, interpreting, resolve_impl, same_device

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _check_int(t, name, length=None):
    check(t.dim() == 1, f"{name} must be 1-D, got shape {tuple(t.shape)}")
    check(not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool),
          f"{name} must be an integer tensor, got {t.dtype}")
    if length is not None:
        check(t.shape[0] == length, f"{name} must have {length} entries, got {t.shape[0]}")


def _check_slots(t, name, S):
    check(t.numel() == 0 or bool(((t >= -1) & (t < S)).all()), f"{name} must be in [-1, {S}) (-1 = no adapter)")


def _check_pool(p, name, last):
    check(p.dim() == 3, f"{name} must be [S, r, {last}], got {tuple(p.shape)}")
    check(p.dtype in DTYPES, f"{name} dtype {p.dtype} unsupported (float32, bfloat16 or float16)")


def _check_shrink(x, a):
    _check_pool(a, "a", "K")
    check(x.dim() == 2, f"x must be [R, K], got {tuple(x.shape)}")
    check(x.shape[1] == a.shape[2], f"x has K={x.shape[1]} columns but a is [S, r, K={a.shape[2]}]")
    check(x.dtype == a.dtype, f"x and a must share a dtype, got {x.dtype} and {a.dtype}")


def _check_expand(y, bt, out):
    _check_pool(bt, "bt", "N")
    check(y.dim() == 2, f"y must be [R, r], got {tuple(y.shape)}")
    check(y.shape[1] == bt.shape[1], f"y has r={y.shape[1]} columns but bt is [S, r={bt.shape[1]}, N]")
    check(y.dtype in DTYPES, f"y dtype {y.dtype} unsupported (float32, bfloat16 or float16)")
    if out is not None:
        R, N = y.shape[0], bt.shape[2]
        check(out.dim() == 2 and tuple(out.shape) == (R, N), f"out must be [R, N] = [{R}, {N}], got "
                                                            f"{tuple(out.shape)}")
        check(out.dtype == bt.dtype, f"out and bt must share a dtype, got {out.dtype} and {bt.dtype}")
        check(N <= 1 or out.stride(1) == 1, f"out must have unit column stride, got strides {out.stride()}")
        check(R <= 1 or out.stride(0) >= N, f"out rows must not overlap, got strides {out.stride()}")


def _check_bgmv(idx, R, S, *tensors):
    _check_int(idx, "idx", R)
    same_device(idx, *(t for t in tensors if t is not None))
    _check_slots(idx, "idx", S)


def _check_sgmv(seg_starts, seg_slots, R, S, *tensors):
    _check_int(seg_starts, "seg_starts")
    check(seg_starts.shape[0] >= 1, "seg_starts must have G+1 >= 1 entries")
    _check_int(seg_slots, "seg_slots", seg_starts.shape[0] - 1)
    same_device(seg_starts, seg_slots, *(t for t in tensors if t is not None))
    check(int(seg_starts[0]) == 0 and int(seg_starts[-1]) == R,
          f"seg_starts must run from 0 to R={R}, got {int(seg_starts[0])} .. {int(seg_starts[-1])}")
    check(bool((seg_starts[1:] >= seg_starts[:-1]).all()), "seg_starts must be non-decreasing")
    _check_slots(seg_slots, "seg_slots", S)


def segments(idx):
    """``(order, seg_starts, seg_slots)`` for any slot-per-row ``idx``: rows ``x[order]`` (sorted by slot, stable)
    form ``G`` segments, segment ``g`` being rows ``seg_starts[g]:seg_starts[g + 1]`` with slot ``seg_slots[g]``
    (-1 included). Scatter SGMV results back with ``out[order] += delta`` or ``out.index_add_(0, order, delta)``."""
    _check_int(idx, "idx")
    order = torch.argsort(idx, stable=True)
    slots, counts = torch.unique_consecutive(idx[order], return_counts=True)
    seg_starts = torch.zeros(slots.numel() + 1, dtype=torch.int64, device=idx.device)
    torch.cumsum(counts, 0, out=seg_starts[1:])
    return order, seg_starts, slots.to(torch.int64)


def _row_slots(seg_starts, seg_slots):
    return torch.repeat_interleave(seg_slots.to(torch.int64), seg_starts[1:] - seg_starts[:-1])


# -- torch references ---------------------------------------------------------------------------------------

def bgmv_shrink_reference(x, a, idx):
    _check_shrink(x, a)
    _check_bgmv(idx, x.shape[0], a.shape[0], x, a)
    idx = idx.to(torch.int64)
    y = torch.bmm(a[idx.clamp(min=0)].float(), x.float()[:, :, None])[:, :, 0]
    return y.masked_fill((idx < 0)[:, None], 0.0)


def bgmv_expand_reference(y, bt, idx, out=None):
    _check_expand(y, bt, out)
    _check_bgmv(idx, y.shape[0], bt.shape[0], y, bt, out)
    idx = idx.to(torch.int64)
    delta = torch.bmm(y.float()[:, None, :], bt[idx.clamp(min=0)].float())[:, 0]
    delta = delta.masked_fill((idx < 0)[:, None], 0.0)
    if out is None:
        return delta.to(bt.dtype)
    rows = (idx >= 0).nonzero()[:, 0]
    out[rows] = (out[rows].float() + delta[rows]).to(out.dtype)
    return out


def sgmv_shrink_reference(x, a, seg_starts, seg_slots):
    _check_shrink(x, a)
    _check_sgmv(seg_starts, seg_slots, x.shape[0], a.shape[0], x, a)
    return bgmv_shrink_reference(x, a, _row_slots(seg_starts, seg_slots))


def sgmv_expand_reference(y, bt, seg_starts, seg_slots, out=None):
    _check_expand(y, bt, out)
    _check_sgmv(seg_starts, seg_slots, y.shape[0], bt.shape[0], y, bt, out)
    return bgmv_expand_reference(y, bt, _row_slots(seg_starts, seg_slots), out)


# -- Triton kernels -------------------------------------------------------------------------------------------

@functools.cache
def _bgmv_shrink_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def bgmv_shrink_kernel(x_ptr, a_ptr, idx_ptr, y_ptr, K, RANK, sx, BLOCK_R: tl.constexpr,
                           BLOCK_K: tl.constexpr):
        i = tl.program_id(0).to(tl.int64)
        ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        s = tl.load(idx_ptr + i)
        k_end = tl.where(s >= 0, K, 0)  # no adapter: no loads, zeros stored
        a_row = a_ptr + tl.maximum(s, 0) * RANK * K + ranks[:, None] * K
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for k0 in range(0, k_end, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            xv = tl.load(x_ptr + i * sx + k, mask=k < K, other=0.0).to(tl.float32)
            av = tl.load(a_row + k[None, :], mask=(ranks < RANK)[:, None] & (k < K)[None, :],
                         other=0.0).to(tl.float32)
            acc += tl.sum(av * xv[None, :], axis=1)
        tl.store(y_ptr + i * RANK + ranks, acc, mask=ranks < RANK)

    return bgmv_shrink_kernel


@functools.cache
def _bgmv_expand_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def bgmv_expand_kernel(y_ptr, b_ptr, idx_ptr, out_ptr, RANK, N, so, ADD: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
        i = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        s = tl.load(idx_ptr + i)
        r_end = tl.where(s >= 0, RANK, 0)
        b_slot = b_ptr + tl.maximum(s, 0) * RANK * N
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for j0 in range(0, r_end, BLOCK_R):
            j = j0 + tl.arange(0, BLOCK_R)
            yv = tl.load(y_ptr + i * RANK + j, mask=j < RANK, other=0.0)
            bv = tl.load(b_slot + j[:, None] * N + cols[None, :], mask=(j < RANK)[:, None] & (cols < N)[None, :],
                         other=0.0).to(tl.float32)
            acc += tl.sum(yv[:, None] * bv, axis=0)
        dst = out_ptr + i * so + cols
        if ADD:  # rows without an adapter are neither read nor written
            m = cols < tl.where(s >= 0, N, 0)
            acc += tl.load(dst, mask=m, other=0.0).to(tl.float32)
            tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=m)
        else:
            tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=cols < N)

    return bgmv_expand_kernel


@functools.cache
def _sgmv_shrink_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def sgmv_shrink_kernel(x_ptr, a_ptr, start_ptr, slot_ptr, y_ptr, K, RANK, sx, F32_DOT: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        g = tl.program_id(0)
        first = tl.load(start_ptr + g) + tl.program_id(1) * BLOCK_M
        end = tl.load(start_ptr + g + 1)
        s = tl.load(slot_ptr + g)
        rows = first + tl.arange(0, BLOCK_M)
        ranks = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
        k_end = tl.where((s >= 0) & (first < end), K, 0)  # no adapter, or a tile past the segment: no loads
        a_slot = a_ptr + tl.maximum(s, 0) * RANK * K
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for k0 in range(0, k_end, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            xt = tl.load(x_ptr + rows[:, None] * sx + k[None, :], mask=(rows < end)[:, None] & (k < K)[None, :],
                         other=0.0)
            at = tl.load(a_slot + ranks[None, :] * K + k[:, None], mask=(ranks < RANK)[None, :] & (k < K)[:, None],
                         other=0.0)  # [BLOCK_K, BLOCK_R]: A^T
            if F32_DOT:
                xt = xt.to(tl.float32)
                at = at.to(tl.float32)
            acc = tl.dot(xt, at, acc, input_precision="ieee")
        tl.store(y_ptr + rows[:, None] * RANK + ranks[None, :], acc,
                 mask=(rows < end)[:, None] & (ranks < RANK)[None, :])

    return sgmv_shrink_kernel


@functools.cache
def _sgmv_expand_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def sgmv_expand_kernel(y_ptr, b_ptr, start_ptr, slot_ptr, out_ptr, RANK, N, so, ADD: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        g = tl.program_id(0)
        first = tl.load(start_ptr + g) + tl.program_id(1) * BLOCK_M
        end = tl.load(start_ptr + g + 1)
        s = tl.load(slot_ptr + g)
        rows = first + tl.arange(0, BLOCK_M)
        cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        r_end = tl.where((s >= 0) & (first < end), RANK, 0)
        b_slot = b_ptr + tl.maximum(s, 0) * RANK * N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for j in range(0, r_end):  # rank-1 updates in fp32: r is small, the kernel is bound by out's traffic
            yv = tl.load(y_ptr + rows * RANK + j, mask=rows < end, other=0.0)
            bv = tl.load(b_slot + j * N + cols, mask=cols < N, other=0.0).to(tl.float32)
            acc += yv[:, None] * bv[None, :]
        dst = out_ptr + rows[:, None] * so + cols[None, :]
        if ADD:  # segments without an adapter are neither read nor written
            m = (rows < tl.where(s >= 0, end, 0))[:, None] & (cols < N)[None, :]
            acc += tl.load(dst, mask=m, other=0.0).to(tl.float32)
            tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=m)
        else:
            tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=(rows < end)[:, None] & (cols < N)[None, :])

    return sgmv_expand_kernel


# -- launchers ------------------------------------------------------------------------------------------------

def _rows(x):
    return x if x.shape[1] <= 1 or x.stride(1) == 1 else x.contiguous()


def _shrink_blocks(r, K):
    return min(8, _pow2(r)), max(16, min(512, _pow2(K)))


def _expand_blocks(r, N):
    return min(64, _pow2(r)), max(16, min(128, _pow2(N)))


def bgmv_shrink(x, a, idx, impl: str = "auto"):
    """``y [R, r]`` fp32 with ``y[i] = a[idx[i]] @ x[i]`` (zeros where ``idx[i] == -1``); ``x`` ``[R, K]``."""
    _check_shrink(x, a)
    _check_bgmv(idx, x.shape[0], a.shape[0], x, a)
    if resolve_impl(impl, x, a, idx) == "torch":
        return bgmv_shrink_reference(x, a, idx)
    (R, K), r = x.shape, a.shape[1]
    y = torch.empty((R, r), dtype=torch.float32, device=x.device)
    if y.numel() == 0:
        return y
    x = _rows(x)
    br, bk = _shrink_blocks(r, K)
    _bgmv_shrink_kernel()[(R, (r + br - 1) // br)](x, a.contiguous(), idx.to(torch.int64).contiguous(), y, K, r,
                                                   x.stride(0), BLOCK_R=br, BLOCK_K=bk)
    return y


def bgmv_expand(y, bt, idx, out=None, impl: str = "auto"):
    """``out[i] += y[i] @ bt[idx[i]]`` for rows with ``idx[i] != -1``, in place, and return ``out``.

    ``out`` ``[R, N]`` has ``bt``'s dtype and unit column stride; any row stride, so it may be a column slice
    of a fused projection (``qkv[:, q:q + N]``). Without ``out``, a new ``[R, N]`` tensor in ``bt``'s dtype holding
    ``y @ bt[idx]`` (zero rows for -1). ``y`` ``[R, r]`` is read in fp32, whatever its float dtype."""
    _check_expand(y, bt, out)
    _check_bgmv(idx, y.shape[0], bt.shape[0], y, bt, out)
    if resolve_impl(impl, y, bt, idx) == "torch":
        return bgmv_expand_reference(y, bt, idx, out)
    (R, r), N = y.shape, bt.shape[2]
    add = out is not None
    if out is None:
        out = torch.empty((R, N), dtype=bt.dtype, device=bt.device)
    if out.numel() == 0:
        return out
    br, bn = _expand_blocks(r, N)
    _bgmv_expand_kernel()[(R, (N + bn - 1) // bn)](y.float().contiguous(), bt.contiguous(),
                                                   idx.to(torch.int64).contiguous(), out, r, N, out.stride(0),
                                                   ADD=add, BLOCK_R=br, BLOCK_N=bn)
    return out


def _max_len(seg_starts) -> int:
    return int((seg_starts[1:] - seg_starts[:-1]).max()) if seg_starts.numel() > 1 else 0


def sgmv_shrink(x, a, seg_starts, seg_slots, impl: str = "auto"):
    """``y [R, r]`` fp32: rows ``seg_starts[g]:seg_starts[g + 1]`` of ``x`` times slot ``seg_slots[g]``'s A^T
    (zeros for slot -1). ``seg_starts`` ``[G+1]`` runs from 0 to R; see :func:`segments` for an arbitrary idx."""
    _check_shrink(x, a)
    _check_sgmv(seg_starts, seg_slots, x.shape[0], a.shape[0], x, a)
    if resolve_impl(impl, x, a, seg_starts, seg_slots) == "torch":
        return sgmv_shrink_reference(x, a, seg_starts, seg_slots)
    (R, K), r = x.shape, a.shape[1]
    y = torch.empty((R, r), dtype=torch.float32, device=x.device)
    if y.numel() == 0:
        return y
    x = _rows(x)
    # the interpreter's tl.dot multiplies bf16 tiles as their uint16 bit patterns: there they go through fp32
    bm, br, bk = 32, max(16, min(64, _pow2(r))), max(16, min(64, _pow2(K)))
    grid = (seg_slots.shape[0], (_max_len(seg_starts) + bm - 1) // bm, (r + br - 1) // br)
    _sgmv_shrink_kernel()[grid](x, a.contiguous(), seg_starts.to(torch.int64).contiguous(),
                                seg_slots.to(torch.int64).contiguous(), y, K, r, x.stride(0),
                                F32_DOT=interpreting() and x.dtype == torch.bfloat16, BLOCK_M=bm, BLOCK_R=br,
                                BLOCK_K=bk)
    return y


def sgmv_expand(y, bt, seg_starts, seg_slots, out=None, impl: str = "auto"):
    """Segmented :func:`bgmv_expand`: ``out[rows of g] += y[rows of g] @ bt[seg_slots[g]]``, same ``out`` rules."""
    _check_expand(y, bt, out)
    _check_sgmv(seg_starts, seg_slots, y.shape[0], bt.shape[0], y, bt, out)
    if resolve_impl(impl, y, bt, seg_starts, seg_slots) == "torch":
        return sgmv_expand_reference(y, bt, seg_starts, seg_slots, out)
    (R, r), N = y.shape, bt.shape[2]
    add = out is not None
    if out is None:
        out = torch.empty((R, N), dtype=bt.dtype, device=bt.device)
    if out.numel() == 0:
        return out
    bm, bn = 32, max(16, min(128, _pow2(N)))
    grid = (seg_slots.shape[0], (_max_len(seg_starts) + bm - 1) // bm, (N + bn - 1) // bn)
    _sgmv_expand_kernel()[grid](y.float().contiguous(), bt.contiguous(), seg_starts.to(torch.int64).contiguous(),
                                seg_slots.to(torch.int64).contiguous(), out, r, N, out.stride(0), ADD=add,
                                BLOCK_M=bm, BLOCK_N=bn)
    return out
