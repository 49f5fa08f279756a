"""Triton code for :mod:`workbench.kernels.spec_verify` (imported on first launch, so ``TRITON_INTERPRET``
set before that launch is honoured and importing the launcher never imports Triton)."""

import triton
import triton.language as tl


@triton.jit
def weights(prow, qrow, offs, V, x_rej, scale, HAS_Q: tl.constexpr):
    """max(0, p - scale * q) on one block; q is the draft row, or a point mass on the rejected draft."""
    pv = tl.load(prow + offs, mask=offs < V, other=0.0)
    if HAS_Q:
        qv = tl.load(qrow + offs, mask=offs < V, other=0.0) * scale
    else:
        qv = tl.where(offs == x_rej, scale, 0.0)
    return tl.maximum(pv - qv, 0.0)


@triton.jit
def verify_kernel(d_ptr, q_ptr, p_ptr, ua_ptr, us_ptr, n_ptr, out_ptr, K, V, HAS_Q: tl.constexpr,
                  BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    lane = tl.arange(0, BLOCK)
    n = K
    rejected = 0
    for j in range(K):
        if rejected == 0:
            x = tl.load(d_ptr + b * K + j)
            px = tl.load(p_ptr + (b * (K + 1) + j) * V + x)
            qx = 1.0
            if HAS_Q:
                qx = tl.load(q_ptr + (b * K + j) * V + x)
            u = tl.load(ua_ptr + b * K + j)
            if u * qx >= px:
                n = j
                rejected = 1
    x_rej = tl.load(d_ptr + b * K + tl.minimum(n, K - 1))
    rej = rejected.to(tl.float32)
    prow = p_ptr + (b * (K + 1) + n) * V
    qrow = q_ptr + (b * K + tl.minimum(n, K - 1)) * V
    # weights: residual max(0, p - q) after a rejection, else the bonus row p_K
    z = 0.0
    for start in range(0, V, BLOCK):
        z += tl.sum(weights(prow, qrow, start + lane, V, x_rej, rej, HAS_Q), 0)
    res = tl.where(z > 0, rej, 0.0)  # 1.0: draw from the residual; 0.0: from p itself
    if res == 0.0:
        z = 0.0
        for start in range(0, V, BLOCK):
            z += tl.sum(weights(prow, qrow, start + lane, V, x_rej, 0.0, HAS_Q), 0)
    target = tl.load(us_ptr + b) * z
    acc = 0.0
    pick = V
    last = 0
    for start in range(0, V, BLOCK):
        offs = start + lane
        w = weights(prow, qrow, offs, V, x_rej, res, HAS_Q)
        c = tl.cumsum(w, 0) + acc
        pick = tl.minimum(pick, tl.min(tl.where((c > target) & (w > 0), offs, V), 0))
        last = tl.maximum(last, tl.max(tl.where(w > 0, offs, 0), 0))
        acc += tl.sum(w, 0)
    pick = tl.where(pick == V, last, pick)
    tl.store(n_ptr + b, n.to(tl.int64))
    for j in range(K + 1):
        d = tl.load(d_ptr + b * K + tl.minimum(j, K - 1))
        val = tl.where(j < n, d, tl.where(j == n, pick, -1))
        tl.store(out_ptr + b * (K + 1) + j, val.to(tl.int64))
