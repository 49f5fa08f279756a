"""Steering-strength sweep on SmolLM2-135M-Instruct: behaviour and fluency per strength, two concepts.

Two control vectors are trained with ``ControlVector.train(..., method="pca_diff")`` (repeng's conventions:
unit direction per decoder layer 1..29) from contrast pairs built here, repeng-style: the persona goes in the
user turn of the chat template, ``"Act as if you are extremely happy."`` vs ``"... sad."`` (four adjective
pairs) and ``"Act as if you are a pirate."`` vs ``"... a formal butler."`` (four phrasings), each followed by
the assistant turn opened with one of 12 short neutral suffixes (48 entries per concept).

For each strength ``s`` of a symmetric sweep (default -10 .. +10 in steps of 2; at ``s`` the offset
``s * direction_i`` is added to the output of every decoder layer ``i`` at every position) and for each
vector -- the two concepts and a **random control** (a Gaussian direction per layer, normalised to the
concept vectors' per-layer norm, i.e. unit) -- the script measures:

- **behaviour**: 16 neutral chat prompts (none mentions mood or a persona), greedy, 40 new tokens, steered
  through the engine (``steer(engine, v, s)``); every generation is then scored by the *unsteered* model:

  * sentiment: LM as judge, forced choice. The generation is quoted in a user turn asking "Is the mood of
    this text positive or negative?"; the assistant turn is opened with "The mood of the text is" and the
    score is the log-odds ``log p(" positive") - log p(" negative")`` of the next token (both one token).
    No lexicon, and the judge sees only the text, never the steering.
  * persona: a likelihood-ratio judge, ``(log p(text | system "You are a pirate.") - log p(text | system
    "You are a butler."))`` per token of the text, user turn "Say something.". The forced-choice form
    ("a pirate or a butler?") does not separate hand-written pirate and butler lines for a 135M model, the
    likelihood ratio does (both are checked on 8 + 8 hand-written texts, recorded under ``judge_check``).
    The system prompts are worded differently from the training prompts. A pirate-marker word rate
    (arr, ahoy, matey, ye, ship, treasure, ...) per 100 words is recorded alongside as a lexicon cross-check.

  Each score is the mean over the 16 prompts (with its standard error). Both judges score every vector's
  generations, so the off-target judge (persona score under the sentiment vector and vice versa) and the
  random control show how much a score moves without the concept. As a scale for the scores, the
  unsteered model is also *prompted* into each pole ("Act as if you are extremely happy. <prompt>", ...,
  "Act as if you are a formal butler. <prompt>") and its generations scored the same way.
- **fluency**: perplexity of GPL-3 (``token_windows(tok, "gpl-3", 256, max_windows=4)``, the same 4 x 256
  tokens for every strength) under ``steer(model, v, s)`` -- ``workbench.eval.perplexity.perplexity`` calls
  the bare HF model, so the steering goes in as hooks on the model -- and the repetition rate of the
  generations, ``1 - distinct-2`` (repeated token bigrams / all bigrams, per generation, averaged).

Fluency breaks at the first strength, going out from 0 on each side, where perplexity exceeds
``--ppl-factor`` (2) x the unsteered perplexity, or the repetition rate exceeds ``--max-repetition`` (0.3).

    .venv/bin/python experiments/steer_sweep_smollm2.py          # about 25 min on 1 CPU thread

writes experiments/results/steer_sweep_smollm2.json (provenance fields top-level) and
experiments/results/steer_sweep_smollm2.png, and prints the table.
"""

from __future__ import annotations

import argparse
import math
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from provenance import provenance, write_json  # experiments/ is the script's folder

SENTIMENT_PAIRS = [("happy", "sad"), ("joyful", "miserable"), ("cheerful", "gloomy"), ("delighted", "depressed")]
PERSONA_PAIRS = [("a pirate", "a formal butler"), ("a swashbuckling pirate captain", "a dignified English butler"),
                 ("an old sea pirate", "a polite butler in a manor house"), ("a rowdy pirate", "a proper, formal butler")]
SUFFIXES = ["I", "The", "Today", "Well,", "Let me tell you about", "My favourite thing is", "When I woke up",
            "The weather is", "I think that", "Yesterday I", "Here is what", "In my opinion"]
PROMPTS = ["Describe your morning.", "Tell me about your weekend.", "What is your favourite food?",
           "Describe the city you live in.", "Write a short note to a friend.", "What do you think about rain?",
           "Tell me about your job.", "How was your day?", "Describe a walk in the park.",
           "What did you have for breakfast?", "Tell me a short story about a cat.",
           "What are your plans for tomorrow?", "Describe the view from your window.",
           "What do you think of Mondays?", "Write a sentence about the ocean.", "Introduce yourself."]

SENTIMENT_JUDGE = ("Is the mood of this text positive or negative?", "The mood of the text is",
                   " positive", " negative")
PERSONA_JUDGE = ("You are a pirate.", "You are a butler.", "Say something.")
PIRATE_MARKERS = {"arr", "arrr", "ahoy", "matey", "mateys", "ye", "aye", "avast", "treasure", "ship", "ships",
                  "captain", "sea", "seas", "sail", "sails", "plunder", "booty", "hearties", "pirate", "pirates",
                  "scallywag", "landlubber", "rum", "deck", "crew", "parrot", "me hearties", "shiver", "timbers"}

# hand-written texts the judges must separate (checked and recorded; not used for training or for the sweep)
CHECK = {
    "positive": ["I love this sunny day, everything feels wonderful and bright!",
                 "What a fantastic surprise, I am so happy and grateful.",
                 "The party was amazing and we laughed all night.",
                 "I'm thrilled with the results, this is the best news ever.",
                 "My morning was lovely: fresh coffee, birdsong and a smile.",
                 "She is kind, cheerful and always a joy to be around.",
                 "We won the game and everyone celebrated together.",
                 "This is a delightful little book that made me smile."],
    "negative": ["I hate this rainy day, everything feels awful and grey.",
                 "What a terrible shock, I am so sad and hurt.",
                 "The party was a disaster and everyone left early.",
                 "I'm devastated by the results, this is the worst news ever.",
                 "My morning was miserable: cold coffee, noise and a headache.",
                 "He is cruel, bitter and always unpleasant to be around.",
                 "We lost the game and everyone went home in silence.",
                 "This is a dreary book that made me want to cry."],
    "pirate": ["Arr, matey! Hoist the sails, we be sailin' for buried treasure!",
               "Ahoy! Ye scurvy dogs, swab the deck or walk the plank!",
               "Shiver me timbers, the captain's parrot stole me rum again.",
               "Aye, the sea be rough tonight, but me ship be sturdy.",
               "Yo ho ho, we plundered the merchant ship and took its gold.",
               "Avast ye landlubber, this here island be ours!",
               "Me hearties, raise the Jolly Roger and fire the cannons!",
               "Blimey, a storm be brewin' on the horizon, batten down the hatches!"],
    "butler": ["Very good, sir. Shall I draw your bath at seven o'clock?",
               "Dinner is served in the east dining room, madam.",
               "If I may be so bold, sir, the guests have arrived.",
               "Certainly, my lord. I have polished the silver as requested.",
               "Your tea, madam, with a slice of lemon, as you prefer.",
               "I shall see to it at once, sir. Will there be anything else?",
               "The carriage awaits, my lady. I have taken the liberty of warming the blankets.",
               "Indeed, sir, the household staff are at your disposal."],
}


# -- contrast pairs -----------------------------------------------------------------------------------------
def entries_for(tok, pairs, template: str):
    from workbench.surgery.control import DatasetEntry

    def persona(p: str) -> str:
        return tok.apply_chat_template([{"role": "user", "content": template.format(p)}],
                                       add_generation_prompt=True, tokenize=False)
    return [DatasetEntry(persona(p) + s, persona(n) + s) for p, n in pairs for s in SUFFIXES]


def random_like(vector, seed: int):
    """A Gaussian direction per layer with the norm of ``vector``'s direction there (a same-norm control)."""
    from workbench.surgery.control import ControlVector

    g = torch.Generator().manual_seed(seed)
    dirs = {}
    for layer, v in vector.directions.items():
        r = torch.randn(v.shape[0], generator=g)
        dirs[layer] = r / r.norm() * v.norm()
    return ControlVector(vector.model_type, dirs)


# -- scoring ------------------------------------------------------------------------------------------------
@torch.inference_mode()
def continuation_logprobs(model, pairs: list[tuple[list[int], list[int]]], batch_size: int = 16) -> list[float]:
    """Sum of log p(continuation | context) for each (context ids, continuation ids), right-padded batches."""
    out: list[float] = []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        width = max(len(c) + len(x) for c, x in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for r, (c, x) in enumerate(batch):
            ids[r, :len(c) + len(x)] = torch.tensor(c + x)
            mask[r, :len(c) + len(x)] = 1
        logp = F.log_softmax(model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float(), -1)
        for r, (c, x) in enumerate(batch):
            pos = torch.arange(len(c) - 1, len(c) + len(x) - 1)
            out.append(float(logp[r, pos, torch.tensor(x)].sum()))
    return out


def chat_text(tok, messages) -> str:
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def sentiment_scores(model, tok, texts: list[str]) -> list[float]:
    """log p(" positive") - log p(" negative") from the unsteered model asked about the quoted text."""
    question, opening, pos, neg = SENTIMENT_JUDGE
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    pos_ids, neg_ids = enc(pos), enc(neg)
    pairs = []
    for t in texts:
        ctx = enc(chat_text(tok, [{"role": "user", "content": f'Text: "{t.strip()}"\n\n{question}'}]) + opening)
        pairs += [(ctx, pos_ids), (ctx, neg_ids)]
    lp = continuation_logprobs(model, pairs)
    return [lp[2 * i] - lp[2 * i + 1] for i in range(len(texts))]


def persona_scores(model, tok, texts: list[str]) -> list[float]:
    """Per-token log-likelihood ratio of the text under the pirate vs the butler system prompt."""
    sys_a, sys_b, user = PERSONA_JUDGE
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    ctx_a = enc(chat_text(tok, [{"role": "system", "content": sys_a}, {"role": "user", "content": user}]))
    ctx_b = enc(chat_text(tok, [{"role": "system", "content": sys_b}, {"role": "user", "content": user}]))
    conts = [enc(t.strip()) or [tok.eos_token_id] for t in texts]
    lp = continuation_logprobs(model, [(ctx, x) for x in conts for ctx in (ctx_a, ctx_b)])
    return [(lp[2 * i] - lp[2 * i + 1]) / len(x) for i, x in enumerate(conts)]


def marker_rate(texts: list[str]) -> float:
    """Pirate-marker words per 100 words, over all texts."""
    words = [w for t in texts for w in re.findall(r"[a-z']+", t.lower())]
    return 100.0 * sum(w.strip("'") in PIRATE_MARKERS for w in words) / max(1, len(words))


def repetition(token_ids: list[int]) -> float:
    """1 - distinct-2: the share of a generation's token bigrams that repeat an earlier one."""
    bigrams = list(zip(token_ids, token_ids[1:], strict=False))
    return 1.0 - len(set(bigrams)) / len(bigrams) if bigrams else 0.0


def mean_sem(xs: list[float]) -> tuple[float, float]:
    t = torch.tensor(xs, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=True) / math.sqrt(len(xs))) if len(xs) > 1 else 0.0


def auroc(pos: list[float], neg: list[float]) -> float:
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


# -- the sweep ----------------------------------------------------------------------------------------------
def measure(model, tok, engine, vector, strength: float, prompts, windows, cfg) -> dict:
    from workbench.eval.perplexity import perplexity
    from workbench.surgery.steer import steer

    t0 = time.perf_counter()
    with steer(model, vector, strength):
        ppl = perplexity(model, windows, progress=False)
    with steer(engine, vector, strength):
        results = engine.generate(prompts, cfg)
    texts = [r.text for r in results]
    sent = sentiment_scores(model, tok, texts)
    pers = persona_scores(model, tok, texts)
    reps = [repetition(r.token_ids) for r in results]
    s_mean, s_sem = mean_sem(sent)
    p_mean, p_sem = mean_sem(pers)
    return {"strength": strength, "perplexity": ppl.ppl, "nll": ppl.nll,
            "sentiment_score": s_mean, "sentiment_sem": s_sem, "persona_score": p_mean, "persona_sem": p_sem,
            "pirate_marker_rate": marker_rate(texts), "repetition": sum(reps) / len(reps),
            "distinct2": 1.0 - sum(reps) / len(reps),
            "mean_new_tokens": sum(len(r.token_ids) for r in results) / len(results),
            "texts": texts, "seconds": time.perf_counter() - t0}


def prompted(model, tok, engine, instruction: str, cfg, n_prompts: int) -> dict:
    """The unsteered model told to play the persona in the prompt: what the judges give a prompted persona."""
    from workbench.chat import prompt_ids

    prompts = [prompt_ids(tok, [{"role": "user", "content": f"{instruction} {p}"}]) for p in PROMPTS[:n_prompts]]
    results = engine.generate(prompts, cfg)
    texts = [r.text for r in results]
    s_mean, s_sem = mean_sem(sentiment_scores(model, tok, texts))
    p_mean, p_sem = mean_sem(persona_scores(model, tok, texts))
    reps = [repetition(r.token_ids) for r in results]
    return {"instruction": instruction, "sentiment_score": s_mean, "sentiment_sem": s_sem,
            "persona_score": p_mean, "persona_sem": p_sem, "pirate_marker_rate": marker_rate(texts),
            "repetition": sum(reps) / len(reps),
            "samples": [{"prompt": f"{instruction} {PROMPTS[i]}", "text": texts[i]} for i in (0, 1)],
            "generations": texts}


def breaks(rows: list[dict], ppl0: float, factor: float, max_rep: float) -> dict:
    """First strength on each side of 0 where perplexity > factor * ppl0 or repetition > max_rep."""
    out = {}
    for side, pick in (("negative", lambda s: s < 0), ("positive", lambda s: s > 0)):
        side_rows = sorted((r for r in rows if pick(r["strength"])), key=lambda r: abs(r["strength"]))
        first, reasons, last_ok = None, [], 0.0
        for r in side_rows:
            reasons = ([f"perplexity {r['perplexity']:.1f} > {factor:g} x {ppl0:.1f}"]
                       if r["perplexity"] > factor * ppl0 else [])
            reasons += [f"repetition {r['repetition']:.2f} > {max_rep:g}"] if r["repetition"] > max_rep else []
            if reasons:
                first = r["strength"]
                break
            last_ok = r["strength"]
        # strength where log-perplexity crosses log(factor * ppl0), interpolated on the grid
        cross, prev = None, (0.0, ppl0)
        for r in side_rows:
            if r["perplexity"] > factor * ppl0:
                (s0, p0), (s1, p1) = prev, (r["strength"], r["perplexity"])
                t = (math.log(factor * ppl0) - math.log(p0)) / (math.log(p1) - math.log(p0))
                cross = s0 + t * (s1 - s0)
                break
            prev = (r["strength"], r["perplexity"])
        out[side] = {"first_broken": first, "reasons": reasons if first is not None else [],
                     "last_fluent": last_ok, "ppl_crosses_threshold_at": cross}
    return out


def plot(data: dict, path: Path, ppl0: float, factor: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    colors = {"sentiment": "tab:orange", "persona": "tab:blue", "random": "tab:gray"}
    labels = {"sentiment": "happy-sad vector", "persona": "pirate-butler vector", "random": "random, same norm"}
    for ax, score, title in ((axes[0, 0], "sentiment", "sentiment judge: log-odds ' positive' vs ' negative'"),
                             (axes[0, 1], "persona", "persona judge: per-token log-LR pirate vs butler")):
        for name in ("sentiment", "persona", "random"):
            rows = data[name]["rows"]
            s = [r["strength"] for r in rows]
            m = [r[f"{score}_score"] for r in rows]
            e = [r[f"{score}_sem"] for r in rows]
            ax.errorbar(s, m, yerr=e, marker="o", ms=4, capsize=2, color=colors[name], label=labels[name],
                        lw=2.2 if name == score else 1.0, ls="-" if name in (score, "random") else ":")
        for pole, ls in (("positive", "--"), ("negative", "-.")):
            ref = data["prompted_reference"][f"{score}_{pole}"]
            ax.axhline(ref[f"{score}_score"], color=colors[score], ls=ls, lw=0.8,
                       label=f"prompted: {ref['instruction']}")
        ax.set_title(title, fontsize=9.5)
        ax.set_xlabel("strength")
        ax.axvline(0, color="k", lw=0.5)
        ax.legend(fontsize=7)
    ax = axes[1, 0]
    for name in ("sentiment", "persona", "random"):
        rows = data[name]["rows"]
        ax.plot([r["strength"] for r in rows], [r["perplexity"] for r in rows], marker="o", ms=4,
                color=colors[name], label=labels[name])
    ax.axhline(factor * ppl0, color="red", ls="--", lw=0.8, label=f"{factor:g} x unsteered ({factor * ppl0:.1f})")
    ax.set_yscale("log")
    ax.set_title("GPL-3 perplexity under steering (4 x 256 tokens)", fontsize=9.5)
    ax.set_xlabel("strength")
    ax.legend(fontsize=8)
    ax = axes[1, 1]
    for name in ("sentiment", "persona", "random"):
        rows = data[name]["rows"]
        ax.plot([r["strength"] for r in rows], [r["repetition"] for r in rows], marker="o", ms=4,
                color=colors[name], label=labels[name])
    ax.axhline(data["fluency_rule"]["max_repetition"], color="red", ls="--", lw=0.8, label="threshold")
    ax.set_title("repetition of the generations (1 - distinct-2, token bigrams)", fontsize=9.5)
    ax.set_xlabel("strength")
    ax.legend(fontsize=8)
    gen = data["generation"]
    fig.suptitle(f"{data['model']}, pca_diff control vectors, layers {data['layers'][0]}-{data['layers'][-1]}, "
                 f"{len(gen['prompts'])} prompts x {gen['max_new_tokens']} greedy tokens", fontsize=10.5)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--strengths", type=float, nargs="+", default=[-10, -8, -6, -4, -2, 0, 2, 4, 6, 8, 10])
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many of the 16 prompts")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--ppl-factor", type=float, default=2.0)
    ap.add_argument("--max-repetition", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0, help="seed of the random control direction")
    ap.add_argument("--out", type=Path, default=Path("experiments/results/steer_sweep_smollm2.json"))
    ap.add_argument("--png", type=Path, default=Path("experiments/results/steer_sweep_smollm2.png"))
    args = ap.parse_args(argv)
    if 0 not in args.strengths:
        ap.error("the sweep needs strength 0 (the unsteered reference)")
    torch.set_num_threads(args.threads)

    import workbench
    from workbench.chat import prompt_ids
    from workbench.data.windows import token_windows
    from workbench.engine import Engine, GenerationConfig
    from workbench.eval.perplexity import perplexity
    from workbench.surgery.control import ControlVector
    from workbench.threads import ThreadPolicy

    t_start = time.perf_counter()
    model, tok = workbench.load(args.model, device="cpu", dtype="float32", progress=False)
    model.eval()
    engine = Engine(model, tok, threads=ThreadPolicy(args.threads, args.threads))

    # the judges, on hand-written texts
    check = {"sentiment": {k: sentiment_scores(model, tok, CHECK[k]) for k in ("positive", "negative")},
             "persona": {k: persona_scores(model, tok, CHECK[k]) for k in ("pirate", "butler")}}
    check["sentiment"]["auroc"] = auroc(check["sentiment"]["positive"], check["sentiment"]["negative"])
    check["persona"]["auroc"] = auroc(check["persona"]["pirate"], check["persona"]["butler"])
    print(f"judge check (8 + 8 hand-written texts): sentiment AUROC {check['sentiment']['auroc']:.3f}, "
          f"persona AUROC {check['persona']['auroc']:.3f}")

    sets = {"sentiment": entries_for(tok, SENTIMENT_PAIRS, "Act as if you are extremely {}."),
            "persona": entries_for(tok, PERSONA_PAIRS, "Act as if you are {}.")}
    vectors, train_s = {}, {}
    for name, entries in sets.items():
        t0 = time.perf_counter()
        vectors[name] = ControlVector.train(model, tok, entries, method="pca_diff", progress=False)
        train_s[name] = time.perf_counter() - t0
        print(f"trained {name}: {vectors[name]} from {len(entries)} entries in {train_s[name]:.1f} s")
    vectors["random"] = random_like(vectors["sentiment"], args.seed)
    cos = {f"{a}_vs_{b}": [float(F.cosine_similarity(vectors[a].directions[i], vectors[b].directions[i], dim=0))
                           for i in vectors[a].layers]
           for a, b in (("sentiment", "persona"), ("sentiment", "random"), ("persona", "random"))}

    windows = token_windows(tok, "gpl-3", args.window, max_windows=args.windows)
    ppl_plain = perplexity(model, windows, progress=False).ppl  # no hooks at all, vs strength 0 under steer
    prompts = [prompt_ids(tok, [{"role": "user", "content": p}]) for p in PROMPTS[:args.prompts]]
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens)
    strengths = sorted(args.strengths)

    data: dict = {"fluency_rule": {"ppl_factor": args.ppl_factor, "max_repetition": args.max_repetition}}
    references = {}
    for concept, pairs, template in (("sentiment", SENTIMENT_PAIRS, "Act as if you are extremely {}."),
                                     ("persona", PERSONA_PAIRS, "Act as if you are {}.")):
        for pole, word in zip(("positive", "negative"), pairs[0], strict=True):
            ref = prompted(model, tok, engine, template.format(word), cfg, args.prompts)
            references[f"{concept}_{pole}"] = ref
            print(f"prompted reference {ref['instruction']!r}: sentiment {ref['sentiment_score']:.2f}, persona "
                  f"{ref['persona_score']:.2f}, markers {ref['pirate_marker_rate']:.1f}, repetition "
                  f"{ref['repetition']:.2f}  {ref['generations'][0][:60]!r}", flush=True)

    # strength 0 is the same run for every vector (no offset): measured once, first
    zero = measure(model, tok, engine, vectors["sentiment"], 0.0, prompts, windows, cfg)
    header = (f"{'vector':<10}{'s':>6}{'sentiment':>11}{'persona':>9}{'markers':>9}{'ppl':>9}{'ppl/ppl0':>9}"
              f"{'rep':>6}  sample")
    print(header)
    for name in ("sentiment", "persona", "random"):
        rows = []
        for s in strengths:
            row = dict(zero) if s == 0 else measure(model, tok, engine, vectors[name], float(s), prompts,
                                                    windows, cfg)
            rows.append(row)
            print(f"{name:<10}{s:>6g}{row['sentiment_score']:>11.2f}{row['persona_score']:>9.2f}"
                  f"{row['pirate_marker_rate']:>9.1f}{row['perplexity']:>9.1f}{row['perplexity'] / zero['perplexity']:>9.2f}"
                  f"{row['repetition']:>6.2f}  {row['texts'][0][:60]!r}", flush=True)
        data[name] = {"rows": rows}
    ppl0 = zero["perplexity"]
    for name in ("sentiment", "persona", "random"):
        data[name]["fluency_breaks"] = breaks(data[name]["rows"], ppl0, args.ppl_factor, args.max_repetition)

    # store two samples per row in the table part, the full generations separately
    for name in ("sentiment", "persona", "random"):
        for row in data[name]["rows"]:
            row["samples"] = [{"prompt": PROMPTS[i], "text": row["texts"][i]} for i in (0, 1)]
            row["generations"] = row.pop("texts")

    out = {
        **provenance(),
        "model": args.model,
        "method": "pca_diff",
        "layers": vectors["sentiment"].layers,
        "strengths": strengths,
        "strength_meaning": "offset strength * direction_i (unit vectors) added to blocks.{i}.hook_resid_post, "
                            "every layer 1..29, every position",
        "training": {
            "sentiment": {"template": "Act as if you are extremely {}.", "pairs": SENTIMENT_PAIRS,
                          "n_entries": len(sets["sentiment"]), "seconds": train_s["sentiment"]},
            "persona": {"template": "Act as if you are {}.", "pairs": PERSONA_PAIRS,
                        "n_entries": len(sets["persona"]), "seconds": train_s["persona"]},
            "suffixes": SUFFIXES,
            "random_control": f"Gaussian direction per layer, norm of the sentiment vector's (1), seed {args.seed}",
            "cosine_per_layer": cos,
        },
        "generation": {"prompts": PROMPTS[:args.prompts], "max_new_tokens": args.max_new_tokens,
                       "decoding": "greedy", "steered_through": "steer(engine, vector, strength)"},
        "scores": {
            "sentiment": {"judge": "unsteered model, forced choice", "question": SENTIMENT_JUDGE[0],
                          "assistant_opening": SENTIMENT_JUDGE[1],
                          "score": "log p(' positive') - log p(' negative'), mean over prompts"},
            "persona": {"judge": "unsteered model, likelihood ratio", "system_prompts": list(PERSONA_JUDGE[:2]),
                        "user": PERSONA_JUDGE[2],
                        "score": "(log p(text | pirate) - log p(text | butler)) / tokens, mean over prompts"},
            "pirate_marker_rate": {"words": sorted(PIRATE_MARKERS), "unit": "per 100 words"},
            "repetition": "1 - distinct-2 over token bigrams, per generation, mean over prompts",
        },
        "judge_check": check,
        "prompted_reference": references,
        "perplexity": {"corpus": "gpl-3", "windows": args.windows, "window": args.window,
                       "steered_through": "steer(model, vector, strength) (hooks; perplexity() calls the model)",
                       "unsteered_no_hooks": ppl_plain, "strength_0": ppl0},
        **data,
        "seconds_total": time.perf_counter() - t_start,
    }
    write_json(args.out, out)
    plot(out, args.png, ppl0, args.ppl_factor)
    print(f"unsteered GPL-3 perplexity {ppl_plain:.3f} (no hooks), {ppl0:.3f} (strength 0 under steer)")
    for name in ("sentiment", "persona", "random"):
        b = data[name]["fluency_breaks"]
        print(f"{name}: fluency breaks at {b['negative']['first_broken']} ({'; '.join(b['negative']['reasons'])}) "
              f"and {b['positive']['first_broken']} ({'; '.join(b['positive']['reasons'])})")
    print(f"wrote {args.out} and {args.png} in {out['seconds_total']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
