"""Long-context evaluation: perplexity by position bucket at a given context length, and passkey retrieval.

- :func:`nll_by_position` scores one long window with the model's own forward (logits computed in slices, so
  a 32k-token window never materialises ``[32k, vocab]``); :func:`length_ppl` averages windows per bucket
  of positions, which shows where a model stops using its context. In float32 on CUDA, grouped-query models run
  with :func:`workbench.eval.attention.mha_attention` (PyTorch's GQA path would need O(L^2) memory there).
- :func:`streaming_nll` does the same through an attention-sink cache (:class:`workbench.context.StreamingLM`).
- :func:`passkey_trial` hides a random 5-digit key at a given depth of filler text (Mohtashami & Jaggi 2023)
  and checks whether greedy decoding repeats it.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LengthPPL:
    length: int
    n_windows: int
    ppl: float
    nll: float
    bucket: int
    bucket_nll: list[float]  # mean NLL of the tokens at positions [i * bucket, (i + 1) * bucket)

    def to_dict(self) -> dict:
        return asdict(self)


def _logits_head(model):
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)

    def apply(h):
        logits = head(h).float()
        return torch.tanh(logits / cap) * cap if cap else logits

    return apply


@torch.inference_mode()
def nll_by_position(model, ids: torch.Tensor, slice_len: int = 1024) -> torch.Tensor:
    """Next-token NLL of every position of one window ``ids [L]`` -> ``[L - 1]`` (position i predicts i + 1)."""
    if ids.dim() != 1 or ids.numel() < 2:
        raise ValueError("ids must be a 1-D window of at least 2 tokens")
    from contextlib import nullcontext

    from workbench.eval.attention import mha_attention, needs_mha

    device = next(model.parameters()).device
    ids = ids.to(device)
    with mha_attention(model) if needs_mha(model) else nullcontext():  # fp32 on CUDA: avoid O(L^2) memory
        hidden = model.get_decoder()(input_ids=ids[None]).last_hidden_state[0]
    head = _logits_head(model)
    out = []
    for s in range(0, ids.numel() - 1, slice_len):
        e = min(ids.numel() - 1, s + slice_len)
        out.append(F.cross_entropy(head(hidden[s:e]), ids[s + 1: e + 1], reduction="none"))
    return torch.cat(out).cpu()


def summarize(length: int, nlls: list[torch.Tensor], bucket: int) -> LengthPPL:
    allnll = torch.stack(nlls)  # [n, L - 1]
    buckets = [float(allnll[:, s: s + bucket].mean()) for s in range(0, allnll.shape[1], bucket)]
    mean = float(allnll.mean())
    return LengthPPL(length, len(nlls), math.exp(mean), mean, bucket, buckets)


def length_ppl(model, windows: torch.Tensor, bucket: int = 1024, progress: bool = True) -> LengthPPL:
    """Perplexity over ``windows [n, L]`` (each scored alone) with per-bucket NLL."""
    from tqdm.auto import tqdm

    if windows.dim() != 2:
        raise ValueError("windows must be [n, L]")
    nlls = [nll_by_position(model, w) for w in tqdm(windows, desc=f"ppl@{windows.shape[1]}", disable=not progress)]
    return summarize(windows.shape[1], nlls, bucket)


@torch.inference_mode()
def streaming_nll(stream, ids: torch.Tensor) -> torch.Tensor:
    """NLL of every position of ``ids [L]`` fed through a :class:`~workbench.context.StreamingLM` (reset first)."""
    stream.reset()
    step = stream.cfg.chunk
    out = []
    for s in range(0, ids.numel() - 1, step):
        e = min(ids.numel() - 1, s + step)
        logits = stream.feed(ids[s:e])
        out.append(F.cross_entropy(logits.float(), ids[s + 1: e + 1].to(logits.device), reduction="none"))
    return torch.cat(out).cpu()


# -- passkey -----------------------------------------------------------------------------------------------

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyTrial:
    length: int  # prompt tokens
    depth: float  # where the key sits in the filler, 0 = start, 1 = end
    key: str
    answer: str
    correct: bool

    def to_dict(self) -> dict:
        return asdict(self)


def passkey_prompt(tokenizer, length: int, depth: float, key: str) -> list[int]:
    """Token ids of a passkey prompt of exactly ``length`` tokens with the key at ``depth`` of the filler."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    intro, needle, question, filler = enc(INTRO), enc(NEEDLE.format(key=key)), enc(QUESTION), enc(FILLER)
    room = length - len(intro) - len(needle) - len(question)
    if room < 1:
        raise ValueError(f"length {length} is too short for a passkey prompt (needs > {length - room})")
    body = (filler * (room // len(filler) + 1))[:room]
    at = round(depth * room)
    return intro + body[:at] + needle + body[at:] + question


def passkey_trial(engine, length: int, depth: float, rng: random.Random, max_new_tokens: int = 8) -> PasskeyTrial:
    from workbench.engine import GenerationConfig

    key = str(rng.randint(10000, 99999))
    ids = passkey_prompt(engine.tokenizer, length, depth, key)
    [res] = engine.generate([ids], GenerationConfig(max_new_tokens=max_new_tokens))
    found = re.findall(r"\d{5}", res.text)
    return PasskeyTrial(len(ids), depth, key, res.text, bool(found) and found[0] == key)
