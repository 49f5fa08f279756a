"""Prompt formatting and text generation helpers used by the CLI and the demo."""

from __future__ import annotations

from collections.abc import Sequence

from workbench.threads import DEFAULT_POLICY, ThreadPolicy


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
    threads: ThreadPolicy | None = DEFAULT_POLICY,
) -> str:
    """Generate a continuation of ``ids`` with the workbench engine; temperature 0 is greedy.

    With ``stream=True`` the text is printed to stdout as it is produced. Returns the new text.
    """
    from workbench.engine import Engine, GenerationConfig, SamplingParams

    cfg = GenerationConfig(max_new_tokens=max_new_tokens, seed=seed,
                           sampling=SamplingParams(temperature=temperature, top_p=top_p))
    engine = Engine(model, tokenizer, threads=threads)
    if not stream:
        return engine.generate([list(ids)], cfg)[0].text
    parts = []
    for event in engine.stream([list(ids)], cfg):
        parts.append(event.text)
        print(event.text, end="", flush=True)
    print()
    return "".join(parts)
