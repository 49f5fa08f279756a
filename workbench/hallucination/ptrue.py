"""P(True) (Kadavath et al. 2022): the model's own probability that its proposed answer is true.

The prompt (user turn of the chat template, or plain text with ``chat=False``)::

    Question: {question}
    Proposed Answer: {answer}
    Is the proposed answer:
     (A) True
     (B) False

then the reply opens with ``The proposed answer is:`` and the next-token distribution is read:
``P(True) = P(" A") / (P(" A") + P(" B"))``. The detector score is ``1 - P(True)`` (higher: more likely
hallucinated). ``shots`` adds worked (question, answer, is_true) examples as earlier turns. One forward (a
prefill) per answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

USER_TEMPLATE = ("Question: {question}\nProposed Answer: {answer}\nIs the proposed answer:\n (A) True\n (B) False")


@dataclass(frozen=True)
class PTrueConfig:
    reply_prefix: str = "The proposed answer is:"
    true_text: str = " A"
    false_text: str = " B"
    shots: tuple[tuple[str, str, bool], ...] = ()
    chat: bool = True
    batch_size: int = 16


def _single_token(tok, text: str) -> int:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{text!r} is {len(ids)} tokens for this tokenizer; p-true needs one-token options")
    return ids[0]


def ptrue_prompt(tokenizer, question: str, answer: str, config: PTrueConfig = PTrueConfig()) -> list[int]:
    from workbench.chat import prompt_ids

    letter = {True: config.true_text.strip(), False: config.false_text.strip()}
    if not config.chat:
        parts = [USER_TEMPLATE.format(question=q, answer=a) + f"\n{config.reply_prefix} {letter[t]}"
                 for q, a, t in config.shots]
        parts.append(USER_TEMPLATE.format(question=question, answer=answer) + "\n" + config.reply_prefix)
        return tokenizer("\n\n".join(parts))["input_ids"]
    msgs = []
    for q, a, t in config.shots:
        msgs += [{"role": "user", "content": USER_TEMPLATE.format(question=q, answer=a)},
                 {"role": "assistant", "content": f"{config.reply_prefix} {letter[t]}"}]
    msgs.append({"role": "user", "content": USER_TEMPLATE.format(question=question, answer=answer)})
    return prompt_ids(tokenizer, msgs) + tokenizer(config.reply_prefix, add_special_tokens=False)["input_ids"]


def p_true(engine, questions: Sequence[str], answers: Sequence[str], config: PTrueConfig = PTrueConfig()
           ) -> np.ndarray:
    """P(True) for each (question, proposed answer)."""
    tok = engine.tokenizer
    a_id, b_id = _single_token(tok, config.true_text), _single_token(tok, config.false_text)
    prompts = [ptrue_prompt(tok, q, a, config) for q, a in zip(questions, answers, strict=True)]
    out = []
    with torch.inference_mode():
        for s in range(0, len(prompts), config.batch_size):
            logp = torch.log_softmax(engine.start(prompts[s: s + config.batch_size], 0).logits.float(), -1)
            out += torch.sigmoid(logp[:, a_id] - logp[:, b_id]).tolist()
    return np.asarray(out, dtype=float)


class PTrue:
    name = "p-true"

    def __init__(self, engine, config: PTrueConfig = PTrueConfig()):
        self.engine, self.config = engine, config

    def score(self, generations) -> np.ndarray:
        return 1.0 - p_true(self.engine, [g.question for g in generations], [g.answer for g in generations],
                            self.config)
