"""How good are /v1/embeddings from a small decoder? Dictionary retrieval: each GCIDE headword is the query,
its definition (headword removed) the document to find among all the sampled definitions.

Reports recall@1, recall@10 and MRR per pooled layer (mean pooling, L2-normalised, as the server does), next
to chance. Writes experiments/results/embed_retrieval.json.

    python experiments/embed_retrieval.py [--entries 400] [--layers -1 24 18 12 6]
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from provenance import provenance, write_json

OUT = Path(__file__).resolve().parent / "results" / "embed_retrieval.json"
HEAD = re.compile(r"^(?P<word>[^\\\n]+?) \\[^\\]*\\ *(?P<pos>[^\n]*)\n(?P<body>.*)", re.S)


def entries(n: int) -> list[tuple[str, str]]:
    from workbench.data.corpus import iter_documents

    out, seen = [], set()
    for i, doc in enumerate(iter_documents("gcide")):
        if i % 53:  # a spread-out deterministic sample of the dictionary
            continue
        m = HEAD.match(doc)
        if not m:
            continue
        word = m.group("word").strip()
        body = re.sub(r"\[[^\]]*\]", " ", m.group("body"))
        body = re.sub(r"\s+", " ", body.replace(word, "this")).strip()
        if len(body) < 40 or word.lower() in seen or not word.isalpha():
            continue
        seen.add(word.lower())
        out.append((word, body[:400]))
        if len(out) == n:
            break
    return out


@torch.inference_mode()
def pooled(model, tok, texts, layers, batch=16):
    by_layer = {k: [] for k in layers}
    for s in range(0, len(texts), batch):
        enc = tok(texts[s: s + batch], return_tensors="pt", padding=True)
        hs = model(**enc, output_hidden_states=True, logits_to_keep=1).hidden_states
        m = enc["attention_mask"][..., None].float()
        for k in layers:
            by_layer[k].append(F.normalize((hs[k] * m).sum(1) / m.sum(1), dim=-1))
    return {k: torch.cat(v) for k, v in by_layer.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--entries", type=int, default=400)
    ap.add_argument("--layers", type=int, nargs="+", default=[-1, 24, 18, 12, 6])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    import workbench

    model, tok = workbench.load(args.model, progress=False)
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    pairs = entries(args.entries)
    t0 = time.perf_counter()
    q = pooled(model, tok, [w for w, _ in pairs], args.layers)
    d = pooled(model, tok, [b for _, b in pairs], args.layers)
    n = len(pairs)
    rows = []
    for k in args.layers:
        sims = q[k] @ d[k].T
        rank = (sims > sims.diag()[:, None]).sum(1) + 1  # 1 = the right definition is the nearest
        rows.append({"layer": k, "recall@1": float((rank == 1).float().mean()),
                     "recall@10": float((rank <= 10).float().mean()), "mrr": float((1.0 / rank).mean())})
    chance = {"recall@1": 1 / n, "recall@10": min(1.0, 10 / n), "mrr": float(sum(1 / r for r in range(1, n + 1)) / n)}
    print(f"GCIDE headword -> definition retrieval among {n} definitions ({args.model}, mean pooling)")
    print(f"{'layer':>6} {'R@1':>7} {'R@10':>7} {'MRR':>7}")
    for r in rows:
        print(f"{r['layer']:>6} {r['recall@1']:>7.3f} {r['recall@10']:>7.3f} {r['mrr']:>7.3f}")
    print(f"{'chance':>6} {chance['recall@1']:>7.3f} {chance['recall@10']:>7.3f} {chance['mrr']:>7.3f}")
    write_json(args.out, {**provenance(), "model": args.model, "entries": n, "pooling": "mean",
                          "layers": rows, "chance": chance, "seconds": time.perf_counter() - t0,
                          "sample": pairs[:5]})


if __name__ == "__main__":
    main()
