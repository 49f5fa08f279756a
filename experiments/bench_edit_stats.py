"""Time the key statistics (``C = E[k kᵀ]``) that the SmolLM2 editing defaults need, in one pass.

Collects every layer the ROME, MEMIT and AlphaEdit defaults of ``surgery/hparams/<model>.json`` use, runs
``workbench.surgery.compute_stats`` once over them (uncached, into a scratch folder unless ``--cache``), and
records the time, tokens per second and each layer's spectrum summary (the AlphaEdit null-space size at a few
relative thresholds, the trace).

    .venv/bin/python experiments/bench_edit_stats.py                      # the defaults' token count
    .venv/bin/python experiments/bench_edit_stats.py --tokens 2048 --out /tmp/s.json   # a quick check

writes experiments/results/bench_edit_stats.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from provenance import provenance, write_json  # experiments/ is the script's folder

THRESHOLDS = (1e-2, 3e-3, 1e-3, 3e-4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=None, help="corpus tokens (None: the defaults' stats.tokens)")
    ap.add_argument("--corpus", default=None, help="corpus (None: the defaults' stats.corpus)")
    ap.add_argument("--cache", action="store_true", help="use (and fill) the real statistics cache")
    ap.add_argument("--out", type=Path, default=Path("experiments/results/bench_edit_stats.json"))
    args = ap.parse_args()

    import workbench
    from workbench.surgery.hparams import load_hparams
    from workbench.surgery.stats import compute_stats

    torch.set_num_threads(args.threads)
    model, tok = workbench.load(args.model, device="cpu", progress=False)
    hps = {m: load_hparams(m, model) for m in ("rome", "memit", "alphaedit")}
    layers = sorted({i for hp in hps.values() for i in hp.layers})
    cfg = hps["rome"].stats
    tokens, corpus = args.tokens or cfg.tokens, args.corpus or cfg.corpus
    with tempfile.TemporaryDirectory() as scratch:
        t0 = time.perf_counter()
        st = compute_stats(model, tok, layers, corpus=corpus, tokens=tokens, seq_len=cfg.seq_len,
                           batch_size=cfg.batch_size, cache_dir=None if args.cache else scratch, progress=True)
        seconds = time.perf_counter() - t0
    per_layer = {}
    for i in layers:
        ev = torch.linalg.eigvalsh(st.second_moment(i))
        rel = ev / ev.max()
        per_layer[str(i)] = {
            "trace": float(ev.sum()), "max_eigenvalue": float(ev.max()),
            "null_dims": {str(t): int((rel < t).sum()) for t in THRESHOLDS},
            "null_energy": {str(t): float(ev[rel < t].sum() / ev.sum()) for t in THRESHOLDS},
        }
    result = {"model": args.model, "layers": layers, "corpus": corpus, "tokens": st.tokens,
              "seq_len": cfg.seq_len, "batch_size": cfg.batch_size, "threads": args.threads,
              "seconds": round(seconds, 2), "tokens_per_second": round(st.tokens / seconds, 1),
              "target_seconds": 600, "per_layer": per_layer, **provenance()}
    write_json(args.out, result)


if __name__ == "__main__":
    main()
