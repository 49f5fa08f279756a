"""One process of the two-process key-statistics check in tests/test_surgery.py (run with torchrun, gloo on
CPU): every rank reads its shard of the corpus windows, the sums are all-reduced, rank 0 saves them."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

LAYERS, CORPUS, TOKENS, SEQ_LEN, BATCH = [0, 1], "gpl-3", 3072, 128, 4


def stats(cache_dir):
    from workbench.models.tiny import build_tiny
    from workbench.surgery.stats import compute_stats

    model, tok = build_tiny("llama")
    return compute_stats(model, tok, LAYERS, corpus=CORPUS, tokens=TOKENS, seq_len=SEQ_LEN, batch_size=BATCH,
                         cache=False, cache_dir=cache_dir, progress=False)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        st = stats(out / "cache")
        if dist.get_rank() == 0:
            torch.save({"sums": st.sums, "count": st.count}, out / "ddp.pt")
        # a rank that closes the group while the other still holds its connection aborts ("terminate called
        # without an active exception"): meet before closing it
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
