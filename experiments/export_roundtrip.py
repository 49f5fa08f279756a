"""GGUF round trip of SmolLM2-135M-Instruct (float32) per dtype: file size, write time, the largest logit
difference from the float32 model, bit-equality with the model holding the stored weights, and 16 greedy
tokens on four fact prompts compared with the float32 model. Writes JSON.

    .venv/bin/python experiments/export_roundtrip.py --json experiments/results/export_roundtrip.json
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from provenance import provenance, write_json  # experiments/ is the script's folder

FACTS = ("The capital of France is", "The largest planet in the solar system is",
         "Water is made of hydrogen and", "The author of Romeo and Juliet is")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, GenerationConfig

    import workbench
    from workbench.export import GGUF_DTYPES, reference_state_dict, save_gguf

    torch.set_num_threads(2)
    model, tok = workbench.load("smollm2-135m-instruct", device="cpu", dtype="float32", progress=False)
    gen = GenerationConfig(do_sample=False, max_new_tokens=args.new_tokens, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    prompts = [tok(p, return_tensors="pt").input_ids for p in FACTS]

    @torch.no_grad()
    def run(m):
        return [m(i).logits for i in prompts], [m.generate(i, generation_config=gen)[0, i.shape[1]:].tolist()
                                               for i in prompts]

    base_logits, base_tokens = run(model)
    out = {**provenance(), "model": "smollm2-135m-instruct", "prompts": list(FACTS),
           "fp32_answers": [tok.decode(t) for t in base_tokens], "dtypes": {}}
    with tempfile.TemporaryDirectory() as d:
        for dt in GGUF_DTYPES:
            t0 = time.perf_counter()
            path = save_gguf(model, tok, Path(d) / f"smollm2-{dt}.gguf", dtype=dt)
            write_s = time.perf_counter() - t0
            m2 = AutoModelForCausalLM.from_pretrained(d, gguf_file=path.name, dtype=torch.float32).eval()
            ref = copy.deepcopy(model)
            ref.load_state_dict(reference_state_dict(model, dt))
            logits, tokens = run(m2)
            ref_logits, _ = run(ref)
            out["dtypes"][dt] = {
                "size_mb": round(path.stat().st_size / 1e6, 1),
                "write_s": round(write_s, 2),
                "max_abs_logit_diff_vs_fp32": max((a - b).abs().max().item() for a, b in zip(logits, base_logits, strict=True)),
                "bitwise_equal_vs_stored_weights": all(torch.equal(a, b) for a, b in zip(logits, ref_logits, strict=True)),
                "greedy_equal_vs_fp32": [a == b for a, b in zip(tokens, base_tokens, strict=True)],
                "first_divergence": [next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
                                     for a, b in zip(tokens, base_tokens, strict=True)],
                "answers": [tok.decode(t) for t in tokens],
            }
            print(dt, out["dtypes"][dt])
            del m2, ref
    write_json(args.json, out)


if __name__ == "__main__":
    main()
