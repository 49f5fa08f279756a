"""Sorting-free sampling with temperature, top-k, top-p and min-p fused (per-row parameters and seeds).

Rejection sampling over a moving pivot, the idea behind FlashInfer's sorting-free samplers (Ye et al. 2025,
"FlashInfer"): draw a token from the (temperature) distribution restricted to logits above the pivot, then
check it against the filters with one counting pass (how many tokens, and how much mass, lie strictly above
it). Every kept token lies above any rejected one, so a rejected draw becomes the new pivot and no kept token
is ever excluded; conditioned on acceptance the draw follows the filtered, renormalised distribution exactly.
Each round costs ~2 passes over the row and the pivot climbs fast, so a handful of rounds suffice (no sort).

Filter semantics (the reference below defines them): a token is kept iff fewer than ``top_k`` tokens are
strictly more likely (0 = off), the mass strictly above it is below ``top_p``, and its probability is at least
``min_p`` times the largest. This equals the engine's sequential processors except when top-k and top-p are
both set (the engine renormalises after top-k first); ``workbench.engine`` only dispatches here when they agree.
Temperature 0 means argmax. Rows with a NaN or +inf logit, or no finite logit, give token -1.
"""

from __future__ import annotations

import functools

import torch

from workbench.kernels._launch import check, resolve_impl, same_device

MAX_ROUNDS = 32  # after this many rejections (vanishingly rare) the most likely token is returned


def _check_logits(logits) -> None:
    check(logits.dim() == 2 and logits.shape[1] > 0, f"logits must be [batch, vocab], got {tuple(logits.shape)}")
    check(logits.dtype in (torch.float32, torch.float16, torch.bfloat16), f"logits dtype {logits.dtype} unsupported")


def _params(logits, temperature, top_k, top_p, min_p, seeds):
    _check_logits(logits)
    B, dev = logits.shape[0], logits.device

    def col(v, dtype, name):
        t = torch.as_tensor(v, dtype=dtype, device=dev)
        t = t.expand(B).contiguous() if t.dim() == 0 else t.contiguous()
        check(t.shape == (B,), f"{name} must be a scalar or [batch={B}], got {tuple(t.shape)}")
        return t

    temperature = col(temperature, torch.float32, "temperature")
    top_k = col(top_k, torch.int32, "top_k")
    top_p = col(top_p, torch.float32, "top_p")
    min_p = col(min_p, torch.float32, "min_p")
    seeds = col(seeds, torch.int64, "seeds")
    check(bool((temperature >= 0).all()), "temperature must be >= 0")
    check(bool((top_k >= 0).all()), "top_k must be >= 0 (0 = off)")
    check(bool(((top_p > 0) & (top_p <= 1)).all()), "top_p must be in (0, 1]")
    check(bool(((min_p >= 0) & (min_p <= 1)).all()), "min_p must be in [0, 1]")
    same_device(logits, temperature, top_k, top_p, min_p, seeds)
    return temperature, top_k, top_p, min_p, seeds


def filtered_probs(logits, temperature, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """Torch reference: the distribution the sampler draws from, ``[B, V]`` float32 (zeros for invalid rows;
    a one-hot on the first argmax for temperature-0 rows)."""
    temperature, top_k, top_p, min_p, _ = _params(logits, temperature, top_k, top_p, min_p, 0)
    x = logits.float()
    valid = ~(torch.isnan(x) | (x == float("inf"))).any(-1) & torch.isfinite(x).any(-1)
    greedy = temperature <= 0
    x = torch.where(valid[:, None], x, 0.0)  # invalid rows are zeroed at the end; keep the maths finite
    y = x / torch.where(greedy, 1.0, temperature)[:, None]
    p = torch.softmax(y, -1)
    srt, order = torch.sort(p, -1, descending=True)
    # strictly-greater counts and masses, equal values grouped (ties are kept or dropped together)
    first_of_value = torch.searchsorted(-srt, -srt, side="left")
    mass_excl = torch.cumsum(srt, -1) - srt
    mass_gt_sorted = mass_excl.gather(1, first_of_value)
    keep_sorted = (first_of_value < torch.where(top_k > 0, top_k, p.shape[1] + 1)[:, None])
    keep_sorted &= mass_gt_sorted < torch.where(top_p >= 1, 2.0, top_p)[:, None]
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    keep &= p >= min_p[:, None] * p.max(-1, keepdim=True).values
    out = torch.where(keep, p, 0.0)
    out = out / out.sum(-1, keepdim=True)
    one_hot = torch.nn.functional.one_hot(x.argmax(-1), p.shape[1]).float()
    out = torch.where(greedy[:, None], one_hot, out)
    return torch.where(valid[:, None], out, 0.0)


def sample_reference(logits, temperature, top_k=0, top_p=1.0, min_p=0.0, seeds=0, offset: int = 0):
    """Torch reference sampler (sort-based filter + exponential race, per-row generators seeded with
    ``seed * 1_000_003 + offset``). Same distribution as the kernel, not the same random stream."""
    probs = filtered_probs(logits, temperature, top_k, top_p, min_p)
    _, _, _, _, seeds = _params(logits, temperature, top_k, top_p, min_p, seeds)
    out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for row in range(logits.shape[0]):
        if probs[row].sum() == 0:
            out[row] = -1
            continue
        gen = torch.Generator(device=logits.device).manual_seed(int(seeds[row]) * 1_000_003 + offset)
        noise = torch.empty_like(probs[row]).exponential_(generator=gen)
        out[row] = (probs[row] / noise).argmax()
    return out


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def sample_kernel(logits_ptr, stride, temp_ptr, topk_ptr, topp_ptr, minp_ptr, seed_ptr, out_ptr, offset, V,
                      BLOCK: tl.constexpr, ROUNDS: tl.constexpr, OFFSET_PTR: tl.constexpr):
        row = tl.program_id(0)
        if OFFSET_PTR:  # noqa: SIM108 (a constexpr branch: only one side is compiled)
            # the step counter read on the device (a captured graph replays it from one buffer)
            step = tl.load(offset).to(tl.int32)
        else:
            step = offset
        base = logits_ptr + row.to(tl.int64) * stride
        temp = tl.load(temp_ptr + row)
        k = tl.load(topk_ptr + row)
        top_p = tl.load(topp_ptr + row)
        min_p = tl.load(minp_ptr + row)
        seed = tl.load(seed_ptr + row)
        lane = tl.arange(0, BLOCK)
        inf = float("inf")

        # pass 1: max logit, invalid entries, first argmax
        m = -inf
        bad = 0
        for start in range(0, V, BLOCK):
            offs = start + lane
            x = tl.load(base + offs, mask=offs < V, other=-inf).to(tl.float32)
            bad += tl.sum(((x != x) | (x == inf)).to(tl.int32), 0)
            m = tl.maximum(m, tl.max(tl.where(x == x, x, -inf), 0))
        gidx = V
        for start in range(0, V, BLOCK):
            offs = start + lane
            x = tl.load(base + offs, mask=offs < V, other=-inf).to(tl.float32)
            gidx = tl.minimum(gidx, tl.min(tl.where(x == m, offs, V), 0))
        valid = (bad == 0) & (m > -inf)
        ts = tl.where(temp > 0, temp, 1.0)
        ms = m / ts
        # pass 2: softmax normaliser at this temperature
        s = 0.0
        for start in range(0, V, BLOCK):
            offs = start + lane
            x = tl.load(base + offs, mask=offs < V, other=-inf).to(tl.float32)
            s += tl.sum(tl.where(offs < V, tl.exp(x / ts - ms), 0.0), 0)
        # min-p as a logit floor: p >= min_p * p_max  <=>  y >= y_max + log(min_p)
        floor = tl.where(min_p > 0, ms + tl.log(min_p), -inf)
        pivot = -inf
        result = gidx
        done = ((temp <= 0) | (bad > 0) | (m == -inf)).to(tl.int32)  # int32: the loop reassigns it
        for r in range(ROUNDS):
            if done == 0:
                u = tl.rand(seed, step * ROUNDS + r)
                # mass above the pivot, then the inverse-CDF draw in index order (no sort needed)
                z = 0.0
                for start in range(0, V, BLOCK):
                    offs = start + lane
                    y = tl.load(base + offs, mask=offs < V, other=-inf).to(tl.float32) / ts
                    z += tl.sum(tl.where((offs < V) & (y > pivot) & (y >= floor), tl.exp(y - ms), 0.0), 0)
                target = u * z
                acc = 0.0
                pick = V
                last = 0
                for start in range(0, V, BLOCK):
                    offs = start + lane
                    y = tl.load(base + offs, mask=offs < V, other=-inf).to(tl.float32) / ts
                    ok = (offs < V) & (y > pivot) & (y >= floor)
                    w = tl.where(ok, tl.exp(y - ms), 0.0)
                    c = tl.cumsum(w, 0) + acc
                    pick = tl.minimum(pick, tl.min(tl.where(ok & (c > target), offs, V), 0))
                    last = tl.maximum(last, tl.max(tl.where(ok, offs, 0), 0))
                    acc += tl.sum(w, 0)
                pick = tl.where(pick == V, last, pick)  # rounding put target past the end
                y_pick = tl.load(base + pick).to(tl.float32) / ts
                # how many tokens, and how much mass, lie strictly above the draw
                n_gt = 0
                mass_gt = 0.0
                for start in range(0, V, BLOCK):
                    offs = start + lane
                    y = tl.load(base + offs, mask=offs < V, other=-inf).to(tl.float32) / ts
                    gt = (offs < V) & (y > y_pick)
                    n_gt += tl.sum(gt.to(tl.int32), 0)
                    mass_gt += tl.sum(tl.where(gt, tl.exp(y - ms), 0.0), 0)
                accept = ((k <= 0) | (n_gt < k)) & ((top_p >= 1.0) | (mass_gt / s < top_p))
                if accept:
                    result = pick
                    done = 1
                else:
                    pivot = y_pick
        tl.store(out_ptr + row, tl.where(valid, result, -1).to(tl.int64))

    return sample_kernel


def sample(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seeds=0, offset: int = 0,
           impl: str = "auto") -> torch.Tensor:
    """Draw one token per row: ``[B]`` int64 (-1 for invalid rows). ``offset``: a step counter, so the same
    seeds give fresh draws at each decode step. ``impl``: ``auto`` (Triton on CUDA), ``triton`` or ``torch``."""
    temperature, top_k, top_p, min_p, seeds = _params(logits, temperature, top_k, top_p, min_p, seeds)
    check(not isinstance(offset, torch.Tensor) and offset >= 0, f"offset must be an int >= 0, got {offset}")
    if resolve_impl(impl, logits) == "torch":
        return sample_reference(logits, temperature, top_k, top_p, min_p, seeds, offset)
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    return launch(logits, temperature, top_k, top_p, min_p, seeds, offset, out)


def prepare(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seeds=0):
    """The per-row parameter tensors :func:`launch` takes, checked (values included) against ``logits``
    ``[B, V]``: ``(temperature, top_k, top_p, min_p, seeds)``."""
    return _params(logits, temperature, top_k, top_p, min_p, seeds)


def launch(logits, temperature, top_k, top_p, min_p, seeds, offset, out) -> torch.Tensor:
    """The Triton kernel alone, writing ``out`` ``[B]`` int64: parameters from :func:`prepare`, ``offset`` an int
    or a one-element int64 tensor on the logits' device that the kernel reads (a step counter a CUDA graph can
    advance between replays). Only shapes, dtypes and devices are checked here, never values: nothing reads the
    device, so the launch can be captured in a CUDA graph."""
    _check_logits(logits)
    check(logits.stride(1) == 1, "logits rows must be contiguous (stride 1 along the vocabulary)")
    B, V = logits.shape
    for name, t, dt in (("temperature", temperature, torch.float32), ("top_k", top_k, torch.int32),
                        ("top_p", top_p, torch.float32), ("min_p", min_p, torch.float32),
                        ("seeds", seeds, torch.int64), ("out", out, torch.int64)):
        check(isinstance(t, torch.Tensor) and t.shape == (B,) and t.dtype == dt and t.is_contiguous(),
              f"{name} must be a contiguous [batch={B}] {dt} tensor (see prepare())")
    on_device = isinstance(offset, torch.Tensor)
    if on_device:
        check(offset.shape == (1,) and offset.dtype == torch.int64, "a tensor offset must be one int64 element")
        same_device(logits, offset)
    else:
        check(offset >= 0, f"offset must be >= 0, got {offset}")
    same_device(logits, temperature, top_k, top_p, min_p, seeds, out)
    block = 1024 if V >= 1024 else max(16, 1 << (V - 1).bit_length())
    _kernel()[(B,)](logits, logits.stride(0), temperature, top_k, top_p, min_p, seeds, out, offset, V,
                    BLOCK=block, ROUNDS=MAX_ROUNDS, OFFSET_PTR=on_device)
    return out
