"""Context extension on SmolLM2-135M (8192 native positions): passkey accuracy and perplexity at 1x / 2x / 4x
context for none / linear / dynamic-NTK / YaRN (zero-shot), and attention sinks vs a plain window beyond it.

Resumable: every finished cell is appended to the JSON at once and skipped on the next run; ``--report`` only
rebuilds the table and plots. Cells run cheapest first, methods interleaved, so a partial run stays balanced.

    .venv/bin/python experiments/context_extension.py --out experiments/results/context_extension.json

The committed results come from that command (stopped during 4x), then
``--x 4 --methods none yarn linear dynamic-ntk --threads 1`` (stopped after linear) and
``--x 2 --methods yarn --trials 4 --sink-tokens 0 --ppl-max-x 0`` (8 more YaRN trials), then
``--x 2 --methods yarn-1.5x --trials 4 --sink-tokens 0 --ppl-max-x 2 --threads 1`` (YaRN with headroom), then
``--x 4 --methods dynamic-ntk yarn-1.5x yarn none linear --ppl-max-x 4 --sink-tokens 0 --threads 1`` (stopped after
the 4x passkey cells), then on an H100 ``--device cuda`` with that same command (the 4x perplexities) and with
``--x 4 --methods dynamic-ntk yarn-1.5x yarn none linear --trials-4x 2 --depths-4x 0.2 0.5 0.8 --ppl-max-x 0
--sink-tokens 0`` (5 more 4x passkey trials per method). The 1x / 2x perplexities recomputed on the H100
(``--device cuda --x 1 2 --trials 0 --methods none linear dynamic-ntk yarn yarn-1.5x --ppl-max-x 2 --sink-tokens 0``
into a separate file) are in ``context_extension_cuda_check.json``. Rows computed on a GPU carry a ``device`` field.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import time
from pathlib import Path

import torch
from provenance import provenance  # experiments/ is the script's folder

NATIVE = 8192


def load(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"model": None, "native": NATIVE, "passkey": [], "ppl": [], "sinks": []}


def save(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**data, **provenance()}, indent=1) + "\n")  # the newest run that added to it
    tmp.replace(path)


# method name -> (RopeScaling method, scaling factor / context multiple). "yarn-1.5x" is YaRN with headroom:
# factor 3 at 2x context, 6 at 4x (the low frequencies are interpolated further than the length requires).
METHODS = {"none": ("none", 1.0), "linear": ("linear", 1.0), "dynamic-ntk": ("dynamic-ntk", 1.0),
           "yarn": ("yarn", 1.0), "yarn-1.5x": ("yarn", 1.5)}


def scaling_for(method: str, x: int):
    from workbench.context import RopeScaling

    if method not in METHODS:
        raise SystemExit(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    kind, headroom = METHODS[method]
    if kind == "none" or x == 1:
        return RopeScaling("none")
    extra = {"original_max_position_embeddings": NATIVE} if kind in ("yarn", "dynamic-ntk") else {}
    return RopeScaling(kind, float(x) * headroom, **extra)


def run(args) -> dict:
    import workbench
    from workbench.context import SinkConfig, StreamingLM, apply_rope_scaling
    from workbench.data.windows import token_windows
    from workbench.engine import Engine
    from workbench.eval.long_context import length_ppl, passkey_trial, streaming_nll
    from workbench.threads import ThreadPolicy

    torch.set_num_threads(args.threads)
    data = load(args.out)
    data["model"] = args.model
    model, tok = workbench.load(args.model, device=args.device, dtype="float32", progress=False)
    where = {"device": f"cuda ({torch.cuda.get_device_name()})"} if args.device.startswith("cuda") else {}

    @functools.cache  # built on the first passkey cell (perplexity-only runs need none)
    def engine():
        return Engine(model, tok, threads=ThreadPolicy(args.threads, args.threads), prefill_chunk=1024)
    done_pk = {(r["method"], r["x"], r["depth"], r["trial"]) for r in data["passkey"]}
    done_ppl = {(r["method"], r["x"]) for r in data["ppl"]}
    done_sink = {r["n_sink"] for r in data["sinks"]}

    def with_method(method, x, fn):
        handle = apply_rope_scaling(model, scaling_for(method, x))
        try:
            return fn()
        finally:
            handle.remove()

    for x in args.x:
        methods = ["none"] if x == 1 else args.methods
        for trial in range(args.trials if x <= 2 else args.trials_4x):
            for depth in (args.depths if x <= 2 else args.depths_4x):
                for method in methods:
                    if (method, x, depth, trial) in done_pk:
                        continue
                    rng = random.Random(f"{x}-{depth}-{trial}")  # same key and prompt for every method
                    t0 = time.time()
                    res = with_method(method, x, lambda rng=rng, x=x, depth=depth: passkey_trial(engine(), NATIVE * x - 16, depth, rng))
                    row = {"method": method, "x": x, "depth": depth, "trial": trial, "seconds": time.time() - t0,
                           **res.to_dict(), **where}
                    data["passkey"].append(row)
                    save(args.out, data)
                    print(f"passkey {method:>11} {x}x depth {depth:.1f} trial {trial}: {res.correct} "
                          f"({res.answer.strip()!r}, {row['seconds']:.0f}s)", flush=True)
        if x <= args.ppl_max_x:
            windows = token_windows(tok, args.corpus, NATIVE * x, max_windows=args.ppl_windows)
            for method in methods:
                if (method, x) in done_ppl:
                    continue
                t0 = time.time()
                res = with_method(method, x, lambda windows=windows: length_ppl(model, windows, bucket=1024))
                data["ppl"].append({"method": method, "x": x, "seconds": time.time() - t0, **res.to_dict(), **where})
                save(args.out, data)
                print(f"ppl {method:>11} {x}x: {res.ppl:.2f} buckets {[round(b, 2) for b in res.bucket_nll]}",
                      flush=True)
        if x == 1 and args.sink_tokens:
            ids = token_windows(tok, args.corpus, args.sink_tokens, max_windows=1)[0]
            for n_sink in (4, 0):
                if n_sink in done_sink:
                    continue
                t0 = time.time()
                stream = StreamingLM(model, SinkConfig(n_sink=n_sink, window=args.sink_window - n_sink, chunk=128))
                nll = streaming_nll(stream, ids)
                bucket = 1024
                data["sinks"].append({
                    "n_sink": n_sink, "capacity": args.sink_window, "tokens": len(ids), "max_cache": stream.max_length,
                    "ppl": float(nll.mean().exp()), "bucket": bucket, "seconds": time.time() - t0,
                    "bucket_nll": [float(nll[s: s + bucket].mean()) for s in range(0, len(nll), bucket)]})
                save(args.out, data)
                print(f"sinks n_sink={n_sink}: ppl {data['sinks'][-1]['ppl']:.2f}", flush=True)
    return data


def report(data: dict, plots: Path | None) -> None:
    from collections import defaultdict

    acc = defaultdict(list)
    for r in data["passkey"]:
        acc[(r["method"], r["x"])].append(r["correct"])
    print(f"\n{'method':>12} {'x':>3} {'passkey acc':>12} {'n':>4} {'ppl':>8}")
    ppl = {(r["method"], r["x"]): r["ppl"] for r in data["ppl"]}
    for key in sorted(set(acc) | set(ppl), key=lambda k: (k[1], k[0])):
        hits = acc.get(key, [])
        a = f"{sum(hits) / len(hits):.0%}" if hits else "-"
        p = f"{ppl[key]:.2f}" if key in ppl else "-"
        print(f"{key[0]:>12} {key[1]:>3} {a:>12} {len(hits):>4} {p:>8}")
    for r in data["sinks"]:
        print(f"streaming {r['tokens']} tokens, cache {r['capacity']}, n_sink={r['n_sink']}: ppl {r['ppl']:.2f}")
    if plots is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in data["ppl"]:
        xs = [(i + 0.5) * r["bucket"] for i in range(len(r["bucket_nll"]))]
        ax.plot(xs, r["bucket_nll"], marker="o", label=f"{r['method']} {r['x']}x")
    for r in data["sinks"]:
        xs = [(i + 0.5) * r["bucket"] for i in range(len(r["bucket_nll"]))]
        ax.plot(xs, r["bucket_nll"], ls="--", label=f"stream cache {r['capacity']} sinks={r['n_sink']}")
    ax.axvline(NATIVE, color="grey", lw=0.8)
    ax.set(xlabel="position", ylabel="mean NLL (nats)", title="NLL by position")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(plots / "ppl_by_position.png", dpi=120)
    fig, ax = plt.subplots(figsize=(6, 4))
    methods = sorted({m for m, _ in acc})
    xs = sorted({x for _, x in acc})
    for i, m in enumerate(methods):
        vals = [sum(acc[(m, x)]) / len(acc[(m, x)]) if acc.get((m, x)) else float("nan") for x in xs]
        ax.bar([j + i * 0.2 for j in range(len(xs))], vals, width=0.2, label=m)
    ax.set_xticks([j + 0.3 for j in range(len(xs))], [f"{x}x" for x in xs])
    ax.set(ylabel="passkey accuracy", ylim=(0, 1.05), title="Passkey retrieval")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(plots / "passkey.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("--x", type=int, nargs="+", default=[1, 2, 4], help="context multiples of 8192")
    ap.add_argument("--methods", nargs="+", default=["none", "linear", "dynamic-ntk", "yarn"], choices=list(METHODS))
    ap.add_argument("--depths", type=float, nargs="+", default=[0.2, 0.5, 0.8])
    ap.add_argument("--trials", type=int, default=2, help="trials per depth at 1x and 2x")
    ap.add_argument("--trials-4x", type=int, default=1, help="trials per depth at 4x (slow on CPU)")
    ap.add_argument("--depths-4x", type=float, nargs="+", default=[0.5])
    ap.add_argument("--corpus", default="common-licenses")
    ap.add_argument("--ppl-windows", type=int, default=1)
    ap.add_argument("--ppl-max-x", type=int, default=2)
    ap.add_argument("--sink-tokens", type=int, default=16384, help="tokens streamed for sinks vs window (0: skip)")
    ap.add_argument("--sink-window", type=int, default=2048, help="cache capacity for the streaming runs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]; the model runs in float32 on either")
    ap.add_argument("--out", type=Path, default=Path("experiments/results/context_extension.json"))
    ap.add_argument("--plots", type=Path, default=Path("experiments/results/context_extension"))
    ap.add_argument("--report", action="store_true", help="only print the table and write the plots")
    args = ap.parse_args()
    data = load(args.out) if args.report else run(args)
    report(data, args.plots)


if __name__ == "__main__":
    main()
