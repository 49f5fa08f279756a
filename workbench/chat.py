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
    top_k: int = 0,
    min_p: float = 0.0,
    seed: int | None = None,
    stream: bool = False,
    threads: ThreadPolicy | None = DEFAULT_POLICY,
    num_beams: int = 0,
    constraint=None,
    backend: str = "auto",
) -> str:
    """Generate a continuation of ``ids`` with the workbench engine; temperature 0 is greedy.

    ``num_beams > 0`` runs beam search (no streaming, no sampling options); ``constraint`` is a
    :class:`~workbench.engine.Regex` or :class:`~workbench.engine.JsonSchema` the output must match.
    With ``stream=True`` the text is printed to stdout as it is produced. Returns the new text.
    """
    from workbench.engine import BeamConfig, Engine, GenerationConfig, SamplingParams

    engine = Engine(model, tokenizer, threads=threads, backend=backend)
    if num_beams:
        if constraint is not None or temperature:
            raise ValueError("beam search takes no constraint and no sampling temperature")
        text = engine.generate([list(ids)], BeamConfig(num_beams=num_beams, max_new_tokens=max_new_tokens),
                               strategy="beam")[0].text
        if stream:
            print(text)
        return text
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, seed=seed, constraint=constraint,
                           sampling=SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p))
    if not stream:
        return engine.generate([list(ids)], cfg)[0].text
    parts = []
    for event in engine.stream([list(ids)], cfg):
        parts.append(event.text)
        print(event.text, end="", flush=True)
    print()
    return "".join(parts)
