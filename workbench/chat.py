"""Prompt formatting and text generation helpers used by the CLI and the demo.

Generation goes through HF ``generate`` for now; the workbench engine (workbench.engine) replaces it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from workbench.threads import ThreadPolicy, num_threads

DEFAULT_THREADS = ThreadPolicy()


def prompt_ids(tokenizer, messages: Sequence[dict], *, chat: bool = True) -> list[int]:
    """Token ids for a conversation. ``chat=False`` feeds the concatenated message contents raw."""
    if not messages or not any(m.get("content") for m in messages):
        raise ValueError("empty prompt: give at least one non-empty message")
    for m in messages:
        if set(m) != {"role", "content"} or m["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"bad message {m!r}: need keys role (system|user|assistant) and content")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this tokenizer has no chat template; use raw mode (--raw / chat=False)")
        text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    else:
        text = "\n".join(m["content"] for m in messages)
    return tokenizer(text, add_special_tokens=not chat)["input_ids"]


def generate(
    model,
    tokenizer,
    ids: Sequence[int],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stream: bool = False,
    threads: ThreadPolicy | None = DEFAULT_THREADS,
) -> str:
    """Generate a continuation of ``ids``; temperature 0 is greedy. Returns the decoded new text."""
    from transformers import TextStreamer

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    device = next(model.parameters()).device
    input_ids = torch.tensor([list(ids)], device=device)
    kwargs = {"do_sample": False} if temperature == 0 else {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    with num_threads(threads.decode if threads else None), torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            streamer=streamer, **kwargs,
        )
    return tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)
