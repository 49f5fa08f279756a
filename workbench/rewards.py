"""Ready-made rewards for MCTS (:mod:`workbench.engine.mcts`): any ``(text, token_ids) -> float`` works there.

``UnitTests`` runs generated code in :mod:`workbench.sandbox`; the engine itself imports no sandbox.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ExactAnswer:
    """1.0 if the last number in the text equals ``answer`` (so "17 + 25 = 42" counts), else 0.0."""

    answer: float
    pattern: str = r"-?\d+(?:\.\d+)?"

    def __call__(self, text: str, tokens: list[int]) -> float:
        found = re.findall(self.pattern, text.replace(",", ""))
        return float(bool(found) and math.isclose(float(found[-1]), float(self.answer), abs_tol=1e-9))


def _parses(code: str) -> bool:
    try:
        compile(code, "<reply>", "exec")
    except (SyntaxError, ValueError):
        return False
    return True


@dataclass(frozen=True)
class UnitTests:
    """Pass rate of the generated code on ``tests`` in :func:`workbench.sandbox.run_tests`.

    ``prefix`` is prepended (e.g. the function signature the prompt ended with); code is taken from the first
    fenced block when the reply starts with one (or, without a prefix, anywhere); otherwise it is ``prefix``
    plus the text up to the first fence (a reply that continues a block the prompt opened), unless that does not
    parse and the reply has a fenced block (prose, then the block)."""

    tests: tuple[str, ...]
    prefix: str = ""
    limits: object = None

    def __call__(self, text: str, tokens: list[int]) -> float:
        from workbench.sandbox import SandboxLimits, run_tests

        m = re.search(r"```(?:python)?\n(.*?)(?:```|$)", text, re.S)
        code = self.prefix + text.split("```")[0]  # the reply continues the block the prompt opened
        if m and (not text[: m.start()].strip() or not self.prefix or not _parses(code)):
            code = m.group(1)  # the reply is a fenced block, or prose then a block
        return run_tests(code, list(self.tests), self.limits or SandboxLimits()).pass_rate
