"""Prompt formatting and text generation helpers used by the CLI and the demo."""

from __future__ import annotations

from collections.abc import Callable, Sequence


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
    engine,
    ids: Sequence[int],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    stop: Sequence[str] = (),
    seed: int | None = None,
    num_beams: int = 0,
    constraint=None,
    on_text: Callable[[str], None] | None = None,
):
    """Generate a continuation of ``ids`` with ``engine`` (a :class:`workbench.engine.Engine`, built once and
    reused across calls: the packed weights are built once); temperature 0 is greedy.

    ``num_beams > 0`` runs beam search (no sampling options, no constraint); ``constraint`` is a
    :class:`~workbench.engine.Regex` or :class:`~workbench.engine.JsonSchema` the output must match;
    ``on_text`` receives the text as it is produced. Returns the :class:`~workbench.engine.GenerationResult`.
    """
    from workbench.engine import BeamConfig, GenerationConfig, SamplingParams

    if num_beams:
        if constraint is not None or temperature:
            raise ValueError("beam search takes no constraint and no sampling temperature")
        res = engine.generate([list(ids)], BeamConfig(num_beams=num_beams, max_new_tokens=max_new_tokens),
                              strategy="beam")[0]
        if on_text:
            on_text(res.text)
        return res
    sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                              repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
                              presence_penalty=presence_penalty)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, seed=seed, constraint=constraint, sampling=sampling,
                           stop_strings=tuple(stop))
    if on_text is None:
        return engine.generate([list(ids)], cfg)[0]
    from workbench.engine import GenerationResult

    res = GenerationResult(list(ids))
    for event in engine.stream([list(ids)], cfg):
        on_text(event.text)
        res.text += event.text
        if not (event.finished and event.finish_reason == "eos"):  # the EOS token is not part of the output
            res.token_ids.append(event.token_id)
        res.finish_reason = event.finish_reason
    return res


class Chat:
    """A conversation on one engine (built once, reused every turn)."""

    def __init__(self, engine, *, system: str | None = None):
        self.engine = engine
        self.history: list[dict] = [{"role": "system", "content": system}] if system else []

    def reply(self, user: str, **kwargs) -> str:
        """Add the user turn, generate the assistant's (``kwargs`` as for :func:`generate`), return its text."""
        self.history.append({"role": "user", "content": user})
        try:
            res = generate(self.engine, prompt_ids(self.engine.tokenizer, self.history), **kwargs)
        except BaseException:
            self.history.pop()  # an interrupted or failed turn leaves no trace
            raise
        self.history.append({"role": "assistant", "content": res.text.strip()})
        return res.text
