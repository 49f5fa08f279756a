"""One process of the two-process SAE training check in tests/test_sae.py (run with torchrun): each rank trains
on its half of every batch through ``train_sae(..., TrainConfig(accelerate=True))`` and saves its weights.
The batches and configs are defined here once, for the worker and for the single-process reference."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from workbench.sae import SAEConfig, SparseAutoencoder, TrainConfig, train_sae

BATCH, D_IN, D_SAE = 64, 16, 64
STEPS = (1, 2)  # one optimiser step; two, so the second uses AuxK on the latents the first step left silent


def batches(steps: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(32, D_IN, generator=g)
    codes = torch.rand(steps * BATCH, 32, generator=g) * (torch.rand(steps * BATCH, 32, generator=g) < 0.15)
    return list((codes @ basis + 0.5).split(BATCH))  # offset: the mean b_dec initialisation matters


def sae() -> SparseAutoencoder:
    return SparseAutoencoder(SAEConfig(D_IN, D_SAE, "topk", k=4, aux_k=8), seed=0)


def train_config(total_tokens: int, accelerate: bool) -> TrainConfig:
    # total_tokens counts the tokens of all processes; AuxK for latents silent over one (global) batch
    return TrainConfig(total_tokens=total_tokens, lr=1e-2, warmup_steps=1, decay_fraction=0.0,
                       aux_after_tokens=BATCH, dead_after_tokens=BATCH, log_every=1, progress=False,
                       accelerate=accelerate)


def train(data: list[torch.Tensor], total_tokens: int, accelerate: bool = False):
    """(weights, history) after training a fresh SAE on ``data`` (this process's batches)."""
    model = sae()
    res = train_sae(model, iter(data), train_config(total_tokens, accelerate))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, res.history


def main(out: Path) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    try:
        for steps in STEPS:
            part = [b.chunk(world)[rank] for b in batches(steps)]
            weights, history = train(part, steps * BATCH, accelerate=True)
            assert len(history) == steps, "each process must take the global number of steps"
            torch.save(weights, out / f"steps{steps}_rank{rank}.pt")
        # accelerate opens the gloo group and leaves it open; a rank that exits while the other still holds
        # its connection aborts ("terminate called without an active exception"): meet before closing it
        dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
