"""Sparse autoencoders: ReLU + L1, top-k, batch-top-k and JumpReLU, with their training losses.

All share ``f = act(W_enc^T (x - b_dec) + b_enc)``, ``x_hat = W_dec^T f + b_dec`` (SAELens' layout:
``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``), so one file format covers them.

- relu: L1 penalty on ``f * ||W_dec row||`` (Anthropic, "Towards Monosemanticity", 2023; April 2024 update).
- topk: keep the k largest pre-activations (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"),
  with the AuxK loss that teaches dead latents to model the residual error.
- batchtopk: keep the ``k * batch`` largest over the whole batch (Bussmann et al. 2024); inference uses a
  learned global threshold, i.e. it becomes a JumpReLU SAE (as SAELens saves it).
- jumprelu: ``f = pre * H(pre - theta)`` with a per-latent threshold trained by straight-through estimators
  and an L0 penalty (Rajamanoharan et al. 2024, "Jumping Ahead").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu")


@dataclass
class SAEConfig:
    d_in: int
    d_sae: int
    architecture: str = "topk"
    k: int = 32  # topk / batchtopk: active latents per token (on average for batchtopk)
    l1_coefficient: float = 5.0  # relu
    l0_coefficient: float = 1.0  # jumprelu
    jumprelu_bandwidth: float = 0.05  # width of the rectangle kernel of the threshold's STE
    jumprelu_init_threshold: float = 0.05
    aux_k: int | None = None  # AuxK latents; None = d_in // 2 (Gao et al.); 0 disables
    aux_coefficient: float = 1 / 32
    threshold_momentum: float = 0.99  # batchtopk: EMA of the smallest kept activation
    apply_b_dec_to_input: bool = True
    hook_name: str = ""
    model_name: str = ""

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown SAE architecture {self.architecture!r}; choose one of {ARCHITECTURES}")
        if self.d_in < 1 or self.d_sae < 1:
            raise ValueError(f"d_in and d_sae must be positive, got {self.d_in}, {self.d_sae}")
        if self.architecture in ("topk", "batchtopk") and not 1 <= self.k <= self.d_sae:
            raise ValueError(f"k must be in [1, d_sae={self.d_sae}], got {self.k}")
        if self.aux_k is None:
            self.aux_k = min(self.d_in // 2, self.d_sae)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SAEOutput:
    recon: torch.Tensor
    loss: torch.Tensor
    mse: torch.Tensor  # mean over tokens of the summed squared error
    sparsity: torch.Tensor  # the architecture's penalty term (L1, L0) or 0
    aux: torch.Tensor  # AuxK term or 0
    fired: torch.Tensor  # [d_sae] bool: latents active on some token of the batch
    l0: torch.Tensor  # mean active latents per token


class _SparsePre(torch.autograd.Function):
    """Pre-activations ``(x @ W_enc + b_enc)[rows, cols]`` given their (no-grad) values; the backward pass
    touches only those entries: O(nnz * d_in) instead of a dense ``[batch, d_sae]`` matmul.

    ``rows`` is sorted and ``offsets`` marks where each row starts (embedding-bag layout).
    """

    @staticmethod
    def forward(ctx, x, w_enc, b_enc, rows, cols, offsets, values):
        ctx.save_for_backward(x, w_enc, rows, cols, offsets)
        return values.clone()

    @staticmethod
    def backward(ctx, g):
        x, w_enc, rows, cols, offsets = ctx.saved_tensors
        d_sae = w_enc.shape[1]
        g = g.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(cols, w_enc.t().contiguous(), offsets, mode="sum", per_sample_weights=g)
        if ctx.needs_input_grad[1]:
            sparse = torch.sparse_coo_tensor(torch.stack([cols, rows]), g, (d_sae, x.shape[0]), check_invariants=False)
            grad_w = torch.sparse.mm(sparse, x).t()
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(d_sae, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
        return grad_x, grad_w, grad_b, None, None, None, None


class _JumpReLU(torch.autograd.Function):
    """pre * H(pre - theta); d/dtheta by the rectangle-kernel pseudo-derivative (Rajamanoharan et al. 2024)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        near = ((pre - threshold).abs() < eps / 2).to(grad.dtype)
        g_pre = grad * (pre > threshold)
        g_thr = (-(threshold / eps) * near * grad).sum_to_size(threshold.shape)
        return g_pre, g_thr, None


class _Step(torch.autograd.Function):
    """H(pre - theta) for the L0 penalty; gradient only to theta (pseudo-derivative -K(.)/eps)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        near = ((pre - threshold).abs() < eps / 2).to(grad.dtype)
        return None, (-(1.0 / eps) * near * grad).sum_to_size(threshold.shape), None


class SparseAutoencoder(nn.Module):
    def __init__(self, cfg: SAEConfig, *, seed: int | None = 0):
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        w_dec = torch.randn(cfg.d_sae, cfg.d_in, generator=gen)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_dec.t().clone())  # tied init (Gao et al. 2024)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        if cfg.architecture == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), math.log(cfg.jumprelu_init_threshold)))
        if cfg.architecture == "batchtopk":
            self.register_buffer("threshold", torch.zeros(cfg.d_sae))
            self.register_buffer("threshold_initialised", torch.tensor(False))

    # -- inference ------------------------------------------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(f"SAE expects inputs with last dim {self.cfg.d_in}, got {tuple(x.shape)}")
        x = x.to(self.W_enc.dtype)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def thresholds(self) -> torch.Tensor | None:
        """Per-latent inference threshold (JumpReLU form), None for relu / topk."""
        if self.cfg.architecture == "jumprelu":
            return self.log_threshold.exp()
        if self.cfg.architecture == "batchtopk":
            return self.threshold
        return None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_acts(x)
        arch = self.cfg.architecture
        if arch == "relu":
            return pre.relu()
        if arch == "topk":
            vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        return pre.relu() * (pre > self.thresholds())  # jumprelu and batchtopk at inference

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        return acts @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    # -- training -------------------------------------------------------------------------------------------
    def training_forward(self, x: torch.Tensor, dead: torch.Tensor | None = None, *,
                         sparsity_scale: float = 1.0, matmul_dtype: torch.dtype | None = None) -> SAEOutput:
        """Reconstruction + the architecture's losses for a ``[batch, d_in]`` batch.

        ``dead``: bool mask of latents considered dead (for AuxK); ``sparsity_scale`` multiplies the
        L1/L0 coefficient (warm-up). top-k and batch-top-k run sparse: the dense encoder matmul is only used to
        pick latents (optionally in ``matmul_dtype``, e.g. bfloat16), gradients flow through the picked ones.
        """
        cfg = self.cfg
        if cfg.architecture in ("topk", "batchtopk"):
            return self._sparse_forward(x, dead, matmul_dtype)
        pre = self.pre_acts(x)
        if cfg.architecture == "relu":
            acts = pre.relu()
            sparsity = cfg.l1_coefficient * sparsity_scale * (acts * self.W_dec.norm(dim=1)).sum(-1).mean()
        else:  # jumprelu
            thr = self.log_threshold.exp()
            acts = _JumpReLU.apply(pre, thr, cfg.jumprelu_bandwidth)
            l0 = _Step.apply(pre, thr, cfg.jumprelu_bandwidth).sum(-1).mean()
            sparsity = cfg.l0_coefficient * sparsity_scale * l0
        recon = self.decode(acts)
        mse = (x.to(recon.dtype) - recon).pow(2).sum(-1).mean()
        active = acts > 0
        return SAEOutput(recon, mse + sparsity, mse, sparsity, pre.new_zeros(()), active.any(0),
                         active.sum(-1).float().mean())

    def _sparse_forward(self, x, dead, matmul_dtype) -> SAEOutput:
        cfg = self.cfg
        xc = x.to(self.W_enc.dtype)
        if cfg.apply_b_dec_to_input:
            xc = xc - self.b_dec
        with torch.no_grad():
            # selection matmul; in a low-precision dtype the picked values carry its rounding (~0.4% for bf16)
            dt = matmul_dtype or xc.dtype
            pre = torch.addmm(self.b_enc.to(dt), xc.detach().to(dt), self.W_enc.to(dt))
        batch = pre.shape[0]
        if cfg.architecture == "topk":
            vals, cols = pre.topk(cfg.k, dim=-1, sorted=False)
            rows = torch.arange(batch, device=pre.device).repeat_interleave(cfg.k)
            cols, vals = cols.flatten(), vals.flatten().to(xc.dtype)
        else:  # batchtopk: the k * batch largest over the whole batch
            flat = pre.relu().flatten()
            vals, where = flat.topk(min(cfg.k * batch, flat.numel()), sorted=False)
            rows, order = (where // cfg.d_sae).sort(stable=True)
            cols, vals = (where % cfg.d_sae)[order], vals[order].to(xc.dtype)
            self._update_threshold(vals)
        offsets = _offsets(rows, batch)
        acts = _SparsePre.apply(xc, self.W_enc, self.b_enc, rows, cols, offsets, vals).relu()
        recon = F.embedding_bag(cols, self.W_dec, offsets, mode="sum", per_sample_weights=acts) + self.b_dec
        err = x.to(recon.dtype) - recon
        mse = err.pow(2).sum(-1).mean()
        aux = mse.new_zeros(())
        if cfg.aux_k and dead is not None and bool(dead.any()):
            aux = cfg.aux_coefficient * self._aux_loss(xc, pre, dead, err.detach())
        fired = torch.zeros(cfg.d_sae, dtype=torch.bool, device=cols.device)
        live = acts.detach() > 0
        fired[cols[live]] = True
        return SAEOutput(recon, mse + aux, mse, mse.new_zeros(()), aux, fired, live.sum().float() / batch)

    def _aux_loss(self, xc, pre, dead, err) -> torch.Tensor:
        # AuxK (Gao et al. 2024, sec. 2.4 / A.2): reconstruct the residual error with the top aux_k dead
        # latents. The squared error is in the same units as the main MSE (both are sums over d_in, means over
        # tokens), so aux_coefficient is the weight relative to the reconstruction loss, and it is scaled down
        # while fewer than aux_k latents are dead. Dividing by the error's energy instead (~FVU * variance)
        # made the term ~30x weaker on SmolLM2 activations and AuxK revived nothing (dead 4.3% after 6M tokens).
        n_dead = int(dead.sum())
        k = min(self.cfg.aux_k, n_dead)
        batch = pre.shape[0]
        with torch.no_grad():
            vals, cols = pre.masked_fill(~dead, float("-inf")).topk(k, dim=-1, sorted=False)
        rows = torch.arange(batch, device=pre.device).repeat_interleave(k)
        cols, vals = cols.flatten(), vals.flatten().to(xc.dtype)
        offsets = _offsets(rows, batch)
        acts = _SparsePre.apply(xc, self.W_enc, self.b_enc, rows, cols, offsets, vals).relu()
        aux_recon = F.embedding_bag(cols, self.W_dec, offsets, mode="sum", per_sample_weights=acts)
        return min(1.0, n_dead / self.cfg.aux_k) * (aux_recon - err).pow(2).sum(-1).mean()

    @torch.no_grad()
    def _update_threshold(self, kept: torch.Tensor) -> None:
        pos = kept[kept > 0]
        if not pos.numel():
            return
        low = pos.min()
        if not bool(self.threshold_initialised):
            self.threshold.fill_(low)
            self.threshold_initialised.fill_(True)
        else:
            m = self.cfg.threshold_momentum
            self.threshold.mul_(m).add_((1 - m) * low)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Unit-norm decoder rows (used by topk / batchtopk / jumprelu training)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp(min=1e-8))

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the decoder gradient component along each row so unit-norm rows stay unit-norm (Bricken et al.)."""
        if self.W_dec.grad is None:
            return
        w = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp(min=1e-8)
        self.W_dec.grad -= (self.W_dec.grad * w).sum(1, keepdim=True) * w

    @torch.no_grad()
    def fold_scale(self, scale: float) -> None:
        """Make an SAE trained on ``scale * x`` work on raw ``x`` (same latents, reconstruction of ``x``)."""
        self.W_enc.mul_(scale)
        self.W_dec.div_(scale)
        self.b_dec.div_(scale)


def _offsets(rows: torch.Tensor, batch: int) -> torch.Tensor:
    """Start of each row's entries in a row-sorted list (embedding-bag offsets; empty rows allowed)."""
    counts = torch.bincount(rows, minlength=batch)
    return torch.cumsum(counts, 0) - counts
