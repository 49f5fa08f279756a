"""Activation patching vs attribution patching on SmolLM2-135M (factual recall), plus a logit-lens readout.

Clean "The Eiffel Tower is in the city of" (-> " Paris") vs corrupted "The Colosseum is in the city of"
(-> " Rome"), metric logit(" Paris") - logit(" Rome") at the last position. For the residual stream, attention
output and MLP output of every layer and position: full activation patching (one forward per layer and
position batch) and attribution patching (one forward + backward), their correlation, heatmaps, and the
first layer where the logit lens ranks " Paris" first.

    .venv/bin/python experiments/patching_smollm2.py

writes experiments/results/patching_smollm2.json and experiments/results/patching/*.png.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from provenance import provenance, write_json  # experiments/ is the script's folder

PAIRS = {
    "eiffel": ("The Eiffel Tower is in the city of", "The Colosseum is in the city of", " Paris", " Rome"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("experiments/results/patching_smollm2.json"))
    ap.add_argument("--plots", type=Path, default=Path("experiments/results/patching"))
    args = ap.parse_args()

    import workbench
    from workbench.interp import activation_patching, attribution_patching, logit_diff, logit_lens

    torch.set_num_threads(args.threads)
    model, tok = workbench.load(args.model, device="cpu", progress=False)
    model.eval()
    clean_text, corrupt_text, good, bad = PAIRS["eiffel"]
    clean = tok(clean_text, return_tensors="pt").input_ids
    corrupt = tok(corrupt_text, return_tensors="pt").input_ids
    if clean.shape != corrupt.shape:
        raise SystemExit(f"prompts tokenize to different lengths: {clean.shape} vs {corrupt.shape}")
    good_id, bad_id = (tok(t, add_special_tokens=False).input_ids for t in (good, bad))
    assert len(good_id) == len(bad_id) == 1, "answers must be single tokens"
    metric = logit_diff(good_id[0], bad_id[0])
    rows = {"model": args.model, "clean": clean_text, "corrupted": corrupt_text, "answers": [good, bad],
            "tokens": [tok.decode([int(t)]) for t in clean[0]], "kinds": {}}
    print(f"{'kind':<16}{'activation s':>13}{'attribution s':>14}{'pearson r':>11}{'top cell (act)':>22}")
    for kind in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out"):
        t0 = time.time()
        act = activation_patching(model, clean, corrupt, metric, kind=kind, tokenizer=tok)
        t1 = time.time()
        attr = attribution_patching(model, clean, corrupt, metric, kind=kind, tokenizer=tok)
        t2 = time.time()
        a, b = act.scores.flatten(), attr.scores.flatten()
        r = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
        layer, pos = divmod(int(a.abs().argmax()), act.scores.shape[1])
        act.plot(args.plots / f"activation_{kind}.png", title=f"activation patching: {kind}")
        attr.plot(args.plots / f"attribution_{kind}.png", title=f"attribution patching: {kind}")
        rows["kinds"][kind] = {
            "activation_seconds": t1 - t0, "attribution_seconds": t2 - t1, "pearson_r": r,
            "clean_metric": act.clean_metric, "corrupted_metric": act.corrupted_metric,
            "activation_scores": act.scores.tolist(), "attribution_scores": attr.scores.tolist(),
        }
        cell = f"L{layer} {rows['tokens'][pos]!r}"
        print(f"{kind:<16}{t1 - t0:>13.1f}{t2 - t1:>14.1f}{r:>11.3f}{cell:>22}")
    lens = logit_lens(model, clean)
    ranks = lens.rank_of(good_id[0])[:, 0, 0].tolist()
    first = next((i for i, rk in enumerate(ranks) if rk == 0), None)
    rows["logit_lens"] = {"names": lens.names, "rank_of_answer": ranks,
                          "first_top1": lens.names[first] if first is not None else None}
    print(f"logit lens: {good!r} first ranked 1st at {rows['logit_lens']['first_top1']} (ranks {ranks})")
    write_json(args.out, {**provenance(), **rows})
    print(f"wrote {args.out} and {args.plots}/*.png")


if __name__ == "__main__":
    main()
