"""Exceptions raised for bad user input or unavailable resources, with actionable messages."""

from __future__ import annotations

import difflib


class WorkbenchError(Exception):
    """Base class of every error the workbench raises on purpose."""


class UnknownNameError(WorkbenchError, KeyError):
    """An exact-name registry lookup failed."""

    def __init__(self, kind: str, name: str, known: list[str], hint: str = ""):
        lower = {k.lower(): k for k in known}
        close = [lower[c] for c in difflib.get_close_matches(str(name).lower(), list(lower), n=3, cutoff=0.5)]
        msg = f"unknown {kind} {name!r}. Known {kind}s: {', '.join(sorted(known))}."
        if close:
            msg += f" Did you mean {' or '.join(repr(c) for c in close)}? (names are matched exactly)"
        if hint:
            msg += " " + hint
        super().__init__(msg)
        self.name = name

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class ModelUnavailableError(WorkbenchError):
    """A model exists in principle but cannot be obtained here (offline, missing package, bad checksum)."""


class CorpusUnavailableError(WorkbenchError):
    """A text source cannot be read on this machine (missing Debian package, no network, bad path)."""
