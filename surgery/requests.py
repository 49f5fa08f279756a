"""Edit requests: which fact to rewrite, and the prompts that measure the edit.

A request names a prompt that contains the subject, the subject itself and the new target. The prompt is either
a template with ``"{}"`` for the subject (CounterFact's form) or plain text containing the subject verbatim.

Targets are continuations of the prompt. The rule used everywhere (editing, evaluation, the CLI) is
:func:`target_ids`: the text the model sees is ``prompt + sep + target`` with ``sep = " "`` unless the prompt
already ends in whitespace or the target already starts with whitespace (then ``sep = ""``); the target's
tokens are the tokens of that whole text after the prompt's own tokens. For a GPT-2-style BPE (SmolLM2)
``" Rome"`` is then one token, exactly what the model would read after the prompt.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from workbench.errors import WorkbenchError


class BadRequestError(WorkbenchError, ValueError):
    """An edit request that cannot be applied (subject not in the prompt, empty target, ...)."""


def _sep(prompt: str, target: str) -> str:
    return "" if (not prompt or prompt[-1].isspace() or target[:1].isspace()) else " "


def continuation_text(prompt: str, target: str) -> str:
    """``prompt`` followed by ``target`` with the separator rule of :func:`target_ids`."""
    return prompt + _sep(prompt, target) + target


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt as fed to the model before a target (no special tokens added)."""
    return _encode(tokenizer, prompt)


def target_ids(tokenizer, prompt: str, target: str) -> list[int]:
    """Token ids of ``target`` as a continuation of ``prompt`` (see the module docstring for the space rule).

    The ids are the tail of the tokenisation of the joined text after the prompt's tokens. If the tokeniser
    merges across the boundary (the joined text does not start with the prompt's tokens), the target is
    tokenised alone with the separator in front.
    """
    sep = _sep(prompt, target)
    pre = _encode(tokenizer, prompt)
    full = _encode(tokenizer, prompt + sep + target)
    if full[: len(pre)] == pre:
        return full[len(pre):]
    return _encode(tokenizer, sep + target)


def _as_list(x) -> list:
    if x is None:
        return []
    return [x] if isinstance(x, str) else list(x)


@dataclass
class EditRequest:
    prompt: str  # contains "{}" for the subject, or the explicit subject occurs in it verbatim
    target_new: str
    subject: str | None = None
    target_true: str | None = None
    rephrase_prompts: list[str] = field(default_factory=list)
    locality: list[tuple[str, str]] = field(default_factory=list)  # (prompt, answer) pairs that must not change
    portability: list[tuple[str, str]] = field(default_factory=list)  # (prompt, answer) pairs that should follow
    case_id: str | int | None = None

    def __post_init__(self):
        self.rephrase_prompts = _as_list(self.rephrase_prompts)
        self.locality = [tuple(p) for p in self.locality]
        self.portability = [tuple(p) for p in self.portability]

    # -- text forms --------------------------------------------------------------------------------------
    @property
    def is_template(self) -> bool:
        return "{}" in self.prompt

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        if self.is_template:
            if self.subject is None:
                raise BadRequestError(f"prompt {self.prompt!r} has a '{{}}' slot but the request names no subject")
            return self.prompt.replace("{}", self.subject, 1)
        return self.prompt

    @property
    def template(self) -> str:
        """The prompt with ``"{}"`` in place of the (first occurrence of the) subject."""
        if self.is_template:
            return self.prompt
        if not self.subject or self.subject not in self.prompt:
            raise BadRequestError(f"subject {self.subject!r} does not occur in prompt {self.prompt!r}")
        return self.prompt.replace(self.subject, "{}", 1)

    def label(self) -> str:
        return f"case {self.case_id}" if self.case_id is not None else repr(self.text[:60])

    def validate(self, tokenizer=None) -> EditRequest:
        """Raise :class:`BadRequestError` with a clear message when the request cannot be applied."""
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise BadRequestError("edit request has an empty prompt")
        if not self.subject or not self.subject.strip():
            raise BadRequestError(f"edit request {self.prompt!r} names no subject")
        if self.prompt.count("{}") > 1:
            raise BadRequestError(f"prompt {self.prompt!r} has more than one '{{}}' slot")
        if not self.is_template and self.subject not in self.prompt:
            raise BadRequestError(f"subject {self.subject!r} does not occur in prompt {self.prompt!r} "
                                  "(write the subject verbatim or use '{}' for it)")
        if not isinstance(self.target_new, str) or not self.target_new.strip():
            raise BadRequestError(f"edit request {self.label()} has an empty target_new")
        if tokenizer is not None:
            if not target_ids(tokenizer, self.text, self.target_new) or not _encode(tokenizer, self.target_new.strip()):
                raise BadRequestError(f"target_new {self.target_new!r} of {self.label()} tokenizes to nothing")
            if not _encode(tokenizer, self.subject):
                raise BadRequestError(f"subject {self.subject!r} of {self.label()} tokenizes to nothing")
        return self

    # -- (de)serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["locality"] = [list(p) for p in self.locality]
        d["portability"] = [list(p) for p in self.portability]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> EditRequest:
        """Read this class's own fields, EasyEdit's names, or CounterFact's nested record."""
        if not isinstance(d, dict):
            raise BadRequestError(f"an edit request must be a JSON object, got {type(d).__name__}")
        if "requested_rewrite" in d:
            return cls._from_counterfact(d)
        known = {"prompt", "target_new", "subject", "target_true", "rephrase_prompts", "locality", "portability",
                 "case_id", "ground_truth", "rephrase_prompt", "locality_prompt", "locality_ground_truth",
                 "portability_prompt", "portability_ground_truth"}
        extra = sorted(set(d) - known)
        if extra:
            raise BadRequestError(f"unknown edit request fields {extra}; known: {sorted(known)}")
        if "prompt" not in d or "target_new" not in d:
            raise BadRequestError(f"an edit request needs 'prompt' and 'target_new', got fields {sorted(d)}")
        target_true = d.get("target_true", d.get("ground_truth"))
        if isinstance(target_true, list):  # EasyEdit's ground_truth may be a list with one answer
            target_true = target_true[0] if target_true else None
        locality = [tuple(p) for p in d.get("locality", [])]
        locality += _pairs(d.get("locality_prompt"), d.get("locality_ground_truth"), "locality")
        portability = [tuple(p) for p in d.get("portability", [])]
        portability += _pairs(d.get("portability_prompt"), d.get("portability_ground_truth"), "portability")
        return cls(prompt=d["prompt"], target_new=d["target_new"], subject=d.get("subject"),
                   target_true=target_true,
                   rephrase_prompts=_as_list(d.get("rephrase_prompts")) + _as_list(d.get("rephrase_prompt")),
                   locality=locality, portability=portability, case_id=d.get("case_id"))

    @classmethod
    def _from_counterfact(cls, d: dict) -> EditRequest:
        rw = d["requested_rewrite"]
        try:
            prompt, subject = rw["prompt"], rw["subject"]
            new, true = rw["target_new"], rw.get("target_true")
        except KeyError as e:
            raise BadRequestError(f"CounterFact record lacks requested_rewrite[{e.args[0]!r}]") from None
        new = new["str"] if isinstance(new, dict) else new
        true = true["str"] if isinstance(true, dict) else true
        neighborhood = [(p, true) for p in d.get("neighborhood_prompts", [])] if true is not None else []
        return cls(prompt=prompt, target_new=new, subject=subject, target_true=true,
                   rephrase_prompts=list(d.get("paraphrase_prompts", [])), locality=neighborhood,
                   case_id=d.get("case_id"))


def _pairs(prompts, answers, what: str) -> list[tuple[str, str]]:
    prompts, answers = _as_list(prompts), _as_list(answers)
    if len(prompts) != len(answers):
        raise BadRequestError(f"{len(prompts)} {what}_prompt entries but {len(answers)} {what}_ground_truth")
    # EasyEdit sometimes nests each answer in a list
    return [(p, a[0] if isinstance(a, list) else a) for p, a in zip(prompts, answers, strict=True)]


def as_requests(requests) -> list[EditRequest]:
    """A list of :class:`EditRequest` from requests or dicts (one request alone is accepted too)."""
    if isinstance(requests, (EditRequest, dict)):
        requests = [requests]
    out = [r if isinstance(r, EditRequest) else EditRequest.from_dict(r) for r in requests]
    if not out:
        raise BadRequestError("no edit requests given")
    return out


def load_requests(path) -> list[EditRequest]:
    """Read a JSONL file of requests (one JSON object per line; blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise BadRequestError(f"no such requests file: {path}")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(EditRequest.from_dict(json.loads(line)))
        except json.JSONDecodeError as e:
            raise BadRequestError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        except BadRequestError as e:
            raise BadRequestError(f"{path}:{n}: {e}") from None
    if not out:
        raise BadRequestError(f"{path} holds no edit requests")
    return out


def save_requests(path, requests) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in as_requests(requests)), encoding="utf-8")
    return path
