"""Train a small LoRA adapter on SmolLM2 that defines words the way Ambrose Bierce's Devil's Dictionary does
(local text: the Debian package dict-devil), then show per-request switching: the base model and the adapter
answer the same held-out prompts in one batch of the engine. Writes the PEFT folder and a results JSON.

    .venv/bin/python experiments/train_lora_devil.py --out experiments/adapters/devil \
        --json experiments/results/lora_devil.json

Rank 8 on q_proj and v_proj of the last 10 layers (about 0.3 MB in fp16; backward passes stop there, which keeps
training on a 2-core CPU to minutes), 60 AdamW steps of 4 entries. The held-out measure is
the mean per-token negative log-likelihood of 60 unseen Bierce definitions, teacher-forced, with and without the
adapter (lower: the model expects Bierce's style). The adapter is loaded back through ``workbench.lora`` (not
PEFT) for the held-out numbers and the generations.
"""

from __future__ import annotations

import argparse
import random
import re
import time
from pathlib import Path

from provenance import provenance, write_json


def entries(max_tokens: int, tok) -> list[tuple[str, str]]:
    """``(word, definition)`` from the dictionary: the headword and its first paragraph, whitespace collapsed."""
    from workbench.data.corpus import load_documents

    out = []
    for doc in load_documents("devil"):
        m = re.match(r"([A-Z][A-Z '\-]+),\s+(.*)", doc, re.S)
        if not m:
            continue
        word = m.group(1).strip().lower()
        first = re.sub(r"\s+", " ", m.group(2).split("\n\n")[0]).strip()
        definition = f"{m.group(1).strip()}, {first}"
        if 4 <= len(tok(definition)["input_ids"]) <= max_tokens:
            out.append((word, definition))
    return out


def prompt(word: str) -> list[dict]:
    return [{"role": "user", "content": f"Define the word '{word}'."}]


def example(tok, word: str, definition: str) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 on the prompt: the loss covers the reply only)."""
    from workbench.chat import prompt_ids

    p = prompt_ids(tok, prompt(word))
    reply = tok(definition)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    return p + reply, [-100] * len(p) + reply


def mean_nll(tok, pairs, engine, adapter) -> float:
    """Teacher-forced mean NLL per reply token through ``engine``, with LoRA ``adapter`` (None: the base)."""
    import torch

    total, count = 0.0, 0
    for word, definition in pairs:
        ids, labels = example(tok, word, definition)
        with engine.intervene(adapters=[adapter]):
            logits = engine.teacher_forced(ids[:1], ids[1:])
        lab = torch.tensor(labels[1:])
        lp = torch.log_softmax(logits.float(), -1)
        keep = lab != -100
        total += -lp[keep].gather(1, lab[keep][:, None]).sum().item()
        count += int(keep.sum())
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("--out", type=Path, default=Path("experiments/adapters/devil"))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--layers", type=int, default=10, help="adapt the last this many layers")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48, help="longest definition kept")
    ap.add_argument("--held-out", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import peft
    import torch

    import workbench
    from workbench.chat import prompt_ids
    from workbench.engine import Engine, GenerationConfig
    from workbench.engine.config import GREEDY
    from workbench.lora import AdapterRegistry

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tok = workbench.load(args.model, progress=False)
    data = entries(args.max_tokens, tok)
    random.Random(args.seed).shuffle(data)
    test, train = data[: args.held_out], data[args.held_out:]

    n_layers = model.config.num_hidden_layers
    layers = list(range(n_layers - args.layers, n_layers))
    cfg = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.05,
                          target_modules=["q_proj", "v_proj"], layers_to_transform=layers)
    pm = peft.get_peft_model(model, cfg)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=args.lr)
    rng = random.Random(args.seed + 1)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    pm.train()
    losses, t0 = [], time.perf_counter()
    for step in range(args.steps):
        batch = [example(tok, *rng.choice(train)) for _ in range(args.batch)]
        L = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([x + [pad] * (L - len(x)) for x, _ in batch])
        labels = torch.tensor([y + [-100] * (L - len(y)) for _, y in batch])
        mask = (torch.arange(L)[None] < torch.tensor([len(x) for x, _ in batch])[:, None]).long()
        loss = pm(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step + 1}/{args.steps} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    pm.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():  # fp16 on disk (workbench.lora reads it back in float32); the base stays float32
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.data = p.data.half()
    pm.peft_config["default"].base_model_name_or_path = args.model  # the registry name, not a local path
    pm.save_pretrained(args.out)
    (args.out / "README.md").write_text(
        f"# devil: a LoRA adapter for {args.model}\n\nDefines words in the style of Ambrose Bierce's *The Devil's "
        f"Dictionary* (Debian package dict-devil). Rank {args.rank} on q_proj and v_proj of layers {layers[0]}-"
        f"{layers[-1]}, {args.steps} steps; trained by `experiments/train_lora_devil.py` (see docs/lora.md).\n")
    base = pm.unload()  # the base model without the LoRA modules (PEFT never changed its weights)

    reg = AdapterRegistry(base)
    reg.add("devil", args.out)
    eng = Engine(base, tok, adapters=reg)

    nll = {"base": mean_nll(tok, test, eng, None), "devil": mean_nll(tok, test, eng, "devil")}
    words = [w for w, _ in test[:6]]
    ids = [prompt_ids(tok, prompt(w)) for w in words]
    gen_cfg = GenerationConfig(max_new_tokens=40, sampling=GREEDY)
    with eng.intervene(adapters=[None] * len(words) + ["devil"] * len(words)):  # one batch, both models
        outs = eng.generate(ids + ids, gen_cfg)
    samples = [{"word": w, "base": outs[i].text, "devil": outs[len(words) + i].text, "bierce": dict(test)[w]}
               for i, w in enumerate(words)]
    print(f"\nheld-out NLL per token: base {nll['base']:.3f}, with the adapter {nll['devil']:.3f}")
    for s in samples:
        print(f"\n{s['word']}:\n  base : {s['base']}\n  devil: {s['devil']}")
    if args.json:
        write_json(args.json, {**provenance(), "model": args.model, "adapter": str(args.out), "rank": args.rank,
                               "targets": ["q_proj", "v_proj"], "layers": layers, "steps": args.steps, "batch": args.batch,
                               "lr": args.lr, "train_entries": len(train), "held_out_entries": len(test),
                               "train_loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
                               "held_out_nll": {k: round(v, 4) for k, v in nll.items()}, "samples": samples})


if __name__ == "__main__":
    main()
