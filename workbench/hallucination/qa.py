"""Closed-book short-answer QA: answer normalisation, the correctness rule, and the JSONL dataset format.

Normalisation (:func:`normalize_answer`, SQuAD's rule with one change): lowercase; every character that is not
a letter, a digit or whitespace becomes a space (SQuAD deletes punctuation; replacing it keeps word boundaries,
so ``Austen's`` gives ``austen s`` and matches ``Austen``, and ``Moby-Dick`` gives ``moby dick``); accents are
removed (``Zürich`` = ``Zurich``); the articles ``a``, ``an``, ``the`` are dropped; whitespace is collapsed.

Correctness (:func:`is_correct`): a prediction is right when some normalised gold alias occurs in the
normalised prediction as a whole-word span (DPR's "has answer" rule, used for closed-book TriviaQA and NQ),
a gold word of three characters or more also matching its plural in -s / -es (``joule`` / ``joules``).
A sentence answer ("World War II ended in 1945") counts like the bare one ("1945"); the price is that a hedge
naming the right answer among others ("Neptune, or maybe Jupiter") counts as right too. :func:`is_correct_prefix`
is the stricter variant (the alias must open the prediction), reported alongside. A dataset should hold no
alias that occurs in its own question (a restated question would count as right); :func:`load_qa` rejects those.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NON_WORD = re.compile(r"[^0-9a-z\s]")


def normalize_answer(text: str) -> str:
    """Lowercase, strip accents, punctuation to spaces, drop articles, collapse whitespace."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).lower()
    text = _NON_WORD.sub(" ", text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _word_matches(pred_word: str, gold_word: str) -> bool:
    """Equal, or the plural in -s / -es of a gold word of three characters or more (``joule`` / ``joules``;
    not ``C`` / ``Cs`` or ``O`` / ``Os``, which are other elements)."""
    return pred_word == gold_word or (len(gold_word) >= 3 and pred_word in (gold_word + "s", gold_word + "es"))


def _span_at(pred: list[str], gold: list[str], i: int) -> bool:
    return all(_word_matches(p, g) for p, g in zip(pred[i: i + len(gold)], gold, strict=True))


def _contains_words(haystack: str, needle: str) -> bool:
    pred, gold = haystack.split(), needle.split()
    if not gold:
        return False
    return any(_span_at(pred, gold, i) for i in range(len(pred) - len(gold) + 1))


def is_correct(prediction: str, aliases: Iterable[str]) -> bool:
    """Whether a normalised alias occurs in the normalised prediction as a whole-word span."""
    pred = normalize_answer(prediction)
    return any(_contains_words(pred, normalize_answer(a)) for a in aliases)


def is_correct_prefix(prediction: str, aliases: Iterable[str]) -> bool:
    """Stricter: the normalised prediction starts with a normalised alias (whole words)."""
    pred = normalize_answer(prediction).split()
    golds = [normalize_answer(a).split() for a in aliases]
    return any(g and len(pred) >= len(g) and _span_at(pred, g, 0) for g in golds)


@dataclass(frozen=True)
class QAItem:
    """One closed-book question: ``answers`` are the accepted aliases, the first being the canonical one."""

    id: str
    question: str
    answers: tuple[str, ...]
    category: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if not self.question.strip():
            raise ValueError(f"{self.id}: empty question")
        if not self.answers or any(not normalize_answer(a) for a in self.answers):
            raise ValueError(f"{self.id}: every answer alias must be non-empty after normalisation, got "
                             f"{self.answers!r}")

    def correct(self, prediction: str) -> bool:
        return is_correct(prediction, self.answers)

    def to_json(self) -> dict:
        return {"id": self.id, "question": self.question, "answers": list(self.answers),
                "category": self.category, **self.extra}


def check_items(items: Sequence[QAItem]) -> None:
    """Unique ids and questions; no alias occurring in its own question."""
    ids, questions = set(), set()
    for it in items:
        if it.id in ids:
            raise ValueError(f"duplicate id {it.id!r}")
        q = normalize_answer(it.question)
        if q in questions:
            raise ValueError(f"duplicate question {it.question!r}")
        ids.add(it.id)
        questions.add(q)
        leaked = [a for a in it.answers if _contains_words(q, normalize_answer(a))]
        if leaked:
            raise ValueError(f"{it.id}: aliases {leaked} occur in the question {it.question!r}, so restating "
                             "the question would count as a right answer")


def load_qa(path: str | Path) -> list[QAItem]:
    """Read a JSONL file of ``{"id", "question", "answers": [...], "category"}`` objects (checked)."""
    items = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = {"id", "question", "answers"} - set(row)
        if missing:
            raise ValueError(f"{path}:{n}: missing fields {sorted(missing)}")
        extra = {k: v for k, v in row.items() if k not in ("id", "question", "answers", "category")}
        items.append(QAItem(str(row["id"]), row["question"], tuple(row["answers"]), row.get("category", ""), extra))
    check_items(items)
    return items


def write_qa(path: str | Path, items: Sequence[QAItem]) -> None:
    check_items(items)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(it.to_json(), ensure_ascii=False) + "\n" for it in items))
