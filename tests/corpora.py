"""Tests that read the named corpora (Debian packages dict-gcide, dict-jargon, dict-devil, fortunes, and
base-files' common-licenses) call :func:`require` first: where a corpus is not installed the test is skipped
and the reason, with the package to install, shows in pytest's summary (``-ra``), instead of an error."""

from __future__ import annotations

import functools

import pytest

from workbench.data.corpus import iter_documents, share_root
from workbench.errors import CorpusUnavailableError


def missing(name: str) -> str | None:
    """Why corpus ``name`` cannot be read here, or None when it can."""
    return _missing(name, str(share_root()))


@functools.cache
def _missing(name: str, root: str) -> str | None:  # root: the cache key (tests may point DAERT_SHARE_ROOT away)
    try:
        next(iter_documents(name))
    except CorpusUnavailableError as e:
        return str(e)
    except StopIteration:
        return f"corpus {name!r} has no documents here"
    return None


def require(*names: str) -> None:
    """Skip the calling test unless every named corpus is installed."""
    reasons = [r for r in map(missing, names) if r]
    if reasons:
        pytest.skip("; ".join(reasons))
