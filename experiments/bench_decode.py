"""Decode throughput: the workbench engine vs HF ``generate`` on the same prompts and thread setting.

Runs are interleaved (engine, engine on the ``hf`` backend, HF, engine, ...) so drift affects all; prints a
table and writes JSON. Greedy, EOS ignored so every run produces exactly ``--new-tokens`` tokens per request,
and the engine's tokens are checked against HF's. ``bound`` is HF's time per step over the time of the weight
matmuls alone: the largest speed-up any forward with the same fp32 weights could reach on this machine. On
CUDA the engine also runs with ``graphs="cuda"`` (each decode step replayed from one captured CUDA graph;
``engine_cuda_graphs``), and the JSON names the GPU.

    .venv/bin/python experiments/bench_decode.py --repeats 2 --new-tokens 48 \
        --json experiments/results/bench_decode.json   # the committed results
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from provenance import provenance, write_json  # experiments/ is the script's folder

import workbench
from workbench.chat import prompt_ids
from workbench.cpu import cpu_name
from workbench.engine import Engine, GenerationConfig
from workbench.engine.backends import PackedLlamaBackend
from workbench.threads import ThreadPolicy, num_threads

QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
    "Explain gravity to a child.", "Name a famous painter.", "What does a CPU do?",
    "Give me a synonym for happy.", "How many legs does a spider have?",
]


def _prefix_equal(ours: list[int], hf: list[int], eos: int) -> bool:
    """Equal up to our first EOS (HF's ``min_new_tokens`` forbids EOS, the engine's ``ignore_eos`` does not)."""
    n = ours.index(eos) if eos in ours else len(ours)
    return ours[:n] == hf[:n]


def matmul_floor_ms(backend, batch: int, repeats: int = 20) -> float:
    """Median time of one decode step's weight matmuls alone, the faster of two ways per step: BLAS
    (``torch.mm`` on ``[d_in, d_out]`` copies, preallocated outputs, as the fused loop writes) and the native
    skinny kernel on the packed ``[d_out, d_in]`` weights (when built).

    On CPU a small model's decode step is bound by reading the weights, so this is about the time no forward
    with these fp32 weights can beat; ``HF time / floor`` bounds the reachable speed-up.
    """
    from bench_skinny import time_ms, weight_matmuls  # experiments/ is the script's folder

    with torch.inference_mode():
        return min(time_ms(fn, repeats, warmup=3) for fn in weight_matmuls(backend, batch).values())


def run(args) -> dict:
    model, tok = workbench.load(args.model, device=args.device, progress=False)
    cfg = GenerationConfig(max_new_tokens=args.new_tokens, ignore_eos=True)
    tok.padding_side = "left"
    rows = []
    for threads in args.threads:
        policy = ThreadPolicy(prefill=threads, decode=threads)
        engines = {"engine": Engine(model, tok, threads=policy, backend=args.backend),
                   "engine_hf_backend": Engine(model, tok, threads=policy, backend="hf")}
        if getattr(engines["engine"].backend, "native", None) is not None:  # the same backend, Python layer loop
            engines["engine_python_layers"] = Engine(model, tok, threads=policy,
                                                     backend=PackedLlamaBackend(model, native=False))
        if model.device.type == "cuda":
            engines["engine_cuda_graphs"] = Engine(model, tok, threads=policy, backend="hf", graphs="cuda")
        for batch in args.batch:
            ids = [prompt_ids(tok, [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]) for i in range(batch)]
            enc = tok.pad({"input_ids": ids}, return_tensors="pt").to(model.device)
            times = {name: [] for name in [*engines, "hf"]}
            outs = {}
            for rep in range(args.repeats + 1):  # first round is warm-up
                for name, eng in engines.items():
                    t0 = time.perf_counter()
                    outs[name] = eng.generate(ids, cfg)
                    if rep:
                        times[name].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                with num_threads(threads), torch.inference_mode():
                    ref = model.generate(**enc, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                         do_sample=False, pad_token_id=tok.pad_token_id)
                if rep:
                    times["hf"].append(time.perf_counter() - t0)
                hf_ids = ref[:, enc["input_ids"].shape[1]:].tolist()
                same = {name: all(_prefix_equal(o.token_ids, r, tok.eos_token_id) for o, r in zip(out, hf_ids, strict=True))
                        for name, out in outs.items()}
            toks = batch * args.new_tokens
            med = {k: statistics.median(v) for k, v in times.items()}
            row = {"threads": threads, "batch": batch, "new_tokens": args.new_tokens,
                   "backend": engines["engine"].backend.name, "engine_tok_s": toks / med["engine"],
                   "engine_hf_backend_tok_s": toks / med["engine_hf_backend"], "hf_tok_s": toks / med["hf"],
                   "ratio": med["hf"] / med["engine"], "greedy_tokens_equal_hf": same["engine"],
                   "greedy_equal_hf_by_engine": same, "repeats": args.repeats,
                   "native_layers": getattr(engines["engine"].backend, "native", None) is not None}
            for name in ("engine_python_layers", "engine_cuda_graphs"):
                if name in med:
                    row[f"{name}_tok_s"] = toks / med[name]
            if "engine_cuda_graphs" in med:
                row["cuda_graphs_ratio_vs_hf_backend"] = med["engine_hf_backend"] / med["engine_cuda_graphs"]
            backend = engines["engine"].backend
            if hasattr(backend, "layers") and model.device.type == "cpu":
                with num_threads(threads):
                    floor = matmul_floor_ms(backend, batch)
                row["matmul_floor_ms_per_step"] = floor
                row["ratio_bound"] = (med["hf"] / args.new_tokens * 1000) / floor
            rows.append(row)
    gpu = torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else None
    return {"model": args.model, "device": str(model.device), "gpu": gpu,
            "machine": f"{platform.machine()} {cpu_name()} {torch.get_num_threads()} torch threads max",
            "torch": torch.__version__, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts to compare")
    ap.add_argument("--backend", default="auto", help="engine backend under test (default auto)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    out = run(args)
    print(f"{'threads':>7} {'batch':>5} {'backend':>13} {'engine tok/s':>13} {'hf-backend tok/s':>17} "
          f"{'py-layers tok/s':>16} {'graphs tok/s':>13} {'HF tok/s':>9} {'ratio':>6} {'bound':>6} {'same':>5}")
    for r in out["rows"]:
        print(f"{r['threads']:>7} {r['batch']:>5} {r['backend']:>13} {r['engine_tok_s']:>13.1f} "
              f"{r['engine_hf_backend_tok_s']:>17.1f} {r.get('engine_python_layers_tok_s', float('nan')):>16.1f} "
              f"{r.get('engine_cuda_graphs_tok_s', float('nan')):>13.1f} {r['hf_tok_s']:>9.1f} {r['ratio']:>6.2f} "
              f"{r.get('ratio_bound', float('nan')):>6.2f} {str(all(r['greedy_equal_hf_by_engine'].values())):>5}")
    write_json(args.json, {**provenance(), **out})


if __name__ == "__main__":
    main()
