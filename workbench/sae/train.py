"""SAE trainer: Adam, warm-up + linear decay, sparsity warm-up, dead-latent tracking (AuxK), checkpoints,
optional wandb logging (set ``WANDB_MODE=offline`` for offline runs) and accelerate for multi-GPU."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from workbench.sae.model import SparseAutoencoder


@dataclass
class TrainConfig:
    total_tokens: int = 2_000_000
    lr: float = 4e-4
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 50
    decay_fraction: float = 0.2  # linear decay to 0 over the last fraction of training
    sparsity_warmup_steps: int = 0  # linear warm-up of the L1 / L0 coefficient
    dead_after_tokens: int = 500_000  # a latent not fired for this many tokens counts as dead (reported)
    # AuxK trains latents silent for this many tokens (None: dead_after_tokens). Shorter than the reporting
    # window revives latents before they count as dead.
    aux_after_tokens: int | None = None
    # Every this many tokens, re-initialise the latents silent for aux_after_tokens (Bricken et al. 2023,
    # "Towards Monosemanticity": towards inputs the SAE reconstructs badly, Adam state reset). Stops when the
    # lr decay starts, so resampled latents are trained before the end. None: off.
    resample_every_tokens: int | None = None
    input_scale: float = 1.0  # activations are multiplied by this (see ActivationStore.norm_scale); folded at the end
    init_b_dec: str = "mean"  # "mean" of the first batch, or "zeros"
    grad_clip: float | None = 1.0
    matmul_dtype: str | None = None  # e.g. "bfloat16": dtype of the dense latent-selection matmul (top-k kinds)
    log_every: int = 50
    checkpoint_every_tokens: int | None = None
    checkpoint_dir: str | None = None
    wandb_project: str | None = None
    accelerate: bool = False  # wrap with accelerate.Accelerator (launch with `accelerate launch` for multi-GPU)
    progress: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.total_tokens < 1 or self.lr <= 0:
            raise ValueError("total_tokens and lr must be positive")
        if self.init_b_dec not in ("mean", "zeros"):
            raise ValueError(f"init_b_dec must be 'mean' or 'zeros', got {self.init_b_dec!r}")
        if self.checkpoint_every_tokens and not self.checkpoint_dir:
            raise ValueError("checkpoint_every_tokens needs checkpoint_dir")
        if self.resample_every_tokens is not None and self.resample_every_tokens < 1:
            raise ValueError(f"resample_every_tokens must be positive or None, got {self.resample_every_tokens}")


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    dead_fraction: float  # latents not fired in the last dead_after_tokens tokens
    resampled: int = 0  # latent re-initialisations (resample_every_tokens)
    history: list[dict] = field(default_factory=list)


def _lr_factor(step: int, total_steps: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay_start = int(total_steps * (1 - cfg.decay_fraction))
    if cfg.decay_fraction > 0 and step >= decay_start:
        return max(0.0, (total_steps - step) / max(1, total_steps - decay_start))
    return 1.0


def train_sae(sae: SparseAutoencoder, batches: Iterable[torch.Tensor], cfg: TrainConfig) -> TrainResult:
    """Train ``sae`` in place on ``batches`` (e.g. an :class:`ActivationStore`) for ``cfg.total_tokens``.

    At the end ``cfg.input_scale`` is folded into the weights, so the SAE works on raw activations.
    """
    torch.manual_seed(cfg.seed)
    arch = sae.cfg.architecture
    unit_decoder = arch in ("topk", "batchtopk", "jumprelu")
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=cfg.betas)
    core = sae
    matmul_dtype = getattr(torch, cfg.matmul_dtype) if cfg.matmul_dtype else None
    step_fn: torch.nn.Module = _TrainStep(sae, matmul_dtype)
    accelerator = None
    if cfg.accelerate:
        from accelerate import Accelerator

        accelerator = Accelerator()
        step_fn, opt = accelerator.prepare(step_fn, opt)
    device = core.W_enc.device
    run = None
    if cfg.wandb_project:
        import wandb

        run = wandb.init(project=cfg.wandb_project, config={"sae": core.cfg.to_dict(), "train": asdict(cfg)})
    it = iter(batches)
    first = next(it).to(device) * cfg.input_scale
    # With accelerate each process gets its own (equal-sized) part of every batch: token counts, the b_dec
    # initialisation and the fired latents are over all processes, so every process takes the same steps.
    n_proc = accelerator.num_processes if accelerator else 1
    if cfg.init_b_dec == "mean":
        with torch.no_grad():
            mean = first.mean(0)
            core.b_dec.copy_(accelerator.reduce(mean, "mean") if n_proc > 1 else mean)
    batch_size = first.shape[0] * n_proc  # tokens per step, all processes
    total_steps = max(1, cfg.total_tokens // batch_size)
    since_fired = torch.zeros(core.cfg.d_sae, dtype=torch.long, device=device)
    aux_after = cfg.dead_after_tokens if cfg.aux_after_tokens is None else cfg.aux_after_tokens
    history: list[dict] = []
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps * batch_size, unit="tok", unit_scale=True, desc=f"SAE {arch}")
    t0 = time.time()
    next_ckpt = cfg.checkpoint_every_tokens
    next_resample = cfg.resample_every_tokens
    decay_start = int(total_steps * (1 - cfg.decay_fraction)) if cfg.decay_fraction > 0 else total_steps
    resampled = 0
    x = first
    try:
        for step in range(total_steps):
            if step:
                x = next(it).to(device) * cfg.input_scale
            for group in opt.param_groups:
                group["lr"] = cfg.lr * _lr_factor(step, total_steps, cfg)
            scale = min(1.0, (step + 1) / cfg.sparsity_warmup_steps) if cfg.sparsity_warmup_steps else 1.0
            dead = since_fired >= aux_after
            out = step_fn(x, dead, scale)
            opt.zero_grad(set_to_none=True)
            if accelerator:
                accelerator.backward(out.loss)
            else:
                out.loss.backward()
            if unit_decoder:
                core.remove_parallel_grad()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(core.parameters(), cfg.grad_clip)
            opt.step()
            if unit_decoder:
                core.normalize_decoder()
            with torch.no_grad():
                fired = accelerator.reduce(out.fired.int(), "sum") > 0 if n_proc > 1 else out.fired
                since_fired += batch_size
                since_fired[fired] = 0
            tokens = (step + 1) * batch_size
            if next_resample and tokens >= next_resample:
                next_resample += cfg.resample_every_tokens
                if step < decay_start:
                    resampled += _resample(core, opt, since_fired >= aux_after, x, out.recon.detach())
            if step % cfg.log_every == 0 or step == total_steps - 1:
                with torch.no_grad():
                    var = (x - x.mean(0)).pow(2).sum(-1).mean()
                    row = {"step": step, "tokens": tokens, "loss": float(out.loss), "mse": float(out.mse),
                           "fvu": float(out.mse / var), "l0": float(out.l0),
                           "sparsity": float(out.sparsity), "aux": float(out.aux),
                           "dead_fraction": float((since_fired >= cfg.dead_after_tokens).float().mean()),
                           "resampled": resampled, "lr": opt.param_groups[0]["lr"], "seconds": time.time() - t0}
                history.append(row)
                if run is not None:
                    run.log(row, step=step)
                if bar is not None:
                    bar.set_postfix(fvu=f"{row['fvu']:.3f}", l0=f"{row['l0']:.1f}", dead=f"{row['dead_fraction']:.3f}")
            if bar is not None:
                bar.update(batch_size)
            if next_ckpt and tokens >= next_ckpt:
                _checkpoint(core, Path(cfg.checkpoint_dir) / f"tokens_{tokens}", cfg.input_scale)
                next_ckpt += cfg.checkpoint_every_tokens
    finally:
        if bar is not None:
            bar.close()
        if run is not None:
            run.finish()
    core.fold_scale(cfg.input_scale)
    dead_fraction = float((since_fired >= cfg.dead_after_tokens).float().mean())
    return TrainResult(total_steps, total_steps * batch_size, time.time() - t0, dead_fraction, resampled, history)


@torch.no_grad()
def _resample(sae: SparseAutoencoder, opt, silent: torch.Tensor, x: torch.Tensor, recon: torch.Tensor) -> int:
    """Point the ``silent`` latents at batch inputs drawn with probability ~ squared reconstruction error.

    Decoder row = unit direction of that input's error; encoder column = the same direction at the mean norm
    of the live encoder columns (the tied-init scale), encoder bias 0, so the latent fires on inputs like the
    one it was pointed at. Their Adam moments are zeroed. Returns how many latents were re-initialised.
    """
    idx = silent.nonzero().flatten()
    if idx.numel() == 0:
        return 0
    err = (x.to(recon.dtype) - recon).float()
    weight = err.pow(2).sum(-1)
    if float(weight.sum()) <= 0:
        return 0
    idx = idx[: int((weight > 0).sum())]  # one input per latent, among those with an error
    picks = torch.multinomial(weight, idx.numel(), replacement=False)
    direction = err[picks] / err[picks].norm(dim=-1, keepdim=True).clamp(min=1e-8)
    live = ~silent
    ref = live if bool(live.any()) else torch.ones_like(live)  # all silent: scale by every latent's norms
    enc_norm = sae.W_enc[:, ref].norm(dim=0).mean()
    sae.W_dec[idx] = (direction * sae.W_dec[ref].norm(dim=1).mean()).to(sae.W_dec.dtype)
    sae.W_enc[:, idx] = (direction * enc_norm).t().to(sae.W_enc.dtype)
    sae.b_enc[idx] = 0.0
    base = getattr(opt, "optimizer", opt)  # accelerate wraps the optimizer
    for param, sl in ((sae.W_enc, (slice(None), idx)), (sae.W_dec, (idx,)), (sae.b_enc, (idx,))):
        for moment in ("exp_avg", "exp_avg_sq"):
            state = base.state.get(param, {})
            if moment in state:
                state[moment][sl] = 0.0
    return int(idx.numel())


class _TrainStep(torch.nn.Module):
    """The training forward as a module's forward, so a DDP wrapper (accelerate) synchronises gradients."""

    def __init__(self, sae: SparseAutoencoder, matmul_dtype):
        super().__init__()
        self.sae, self.matmul_dtype = sae, matmul_dtype

    def forward(self, x, dead, scale):
        return self.sae.training_forward(x, dead, sparsity_scale=scale, matmul_dtype=self.matmul_dtype)


def _checkpoint(sae: SparseAutoencoder, folder: Path, scale: float) -> None:
    import copy

    from workbench.sae.io import save_sae

    snap = copy.deepcopy(sae)
    snap.fold_scale(scale)
    save_sae(snap, folder)
