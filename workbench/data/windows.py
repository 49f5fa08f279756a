"""Tokenize documents into fixed-length windows (the unit for perplexity, SAE activations, statistics)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import torch

from workbench.data.corpus import iter_documents


def iter_token_windows(
    tokenizer,
    source: str | Iterable[str],
    window: int,
    *,
    separator_id: int | None = None,
    bos: bool = False,
) -> Iterator[list[int]]:
    """Lazily yield consecutive, non-overlapping windows of ``window`` token ids (see :func:`token_windows`).

    Streams: documents are tokenized as the windows are consumed, so a large corpus costs no memory.
    """
    if window < 2:
        raise ValueError(f"window must be >= 2 tokens, got {window}")
    sep = tokenizer.eos_token_id if separator_id is None else separator_id
    if bos and tokenizer.bos_token_id is None:
        raise ValueError("bos=True but the tokenizer has no BOS token")
    body = window - 1 if bos else window
    docs = iter_documents(source) if isinstance(source, str) else iter(source)
    prefix = [tokenizer.bos_token_id] if bos else []
    buf: list[int] = []
    for i, doc in enumerate(docs):
        if i and sep is not None:
            buf.append(sep)
        buf.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        while len(buf) >= body:
            yield prefix + buf[:body]
            del buf[:body]


def token_windows(
    tokenizer,
    source: str | Iterable[str],
    window: int,
    *,
    max_windows: int | None = None,
    separator_id: int | None = None,
    bos: bool = False,
) -> torch.Tensor:
    """Return a ``[n, window]`` int64 tensor of consecutive, non-overlapping token windows.

    Documents (from a corpus source name or an iterable of strings) are tokenized without special
    tokens and joined with ``separator_id`` (default: the tokenizer's EOS). The trailing partial window
    is dropped. With ``bos=True`` each window starts with the BOS token followed by ``window-1`` text tokens.
    """
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1, got {max_windows}")
    rows = list(itertools.islice(iter_token_windows(tokenizer, source, window, separator_id=separator_id, bos=bos),
                                 max_windows))
    if not rows:
        raise ValueError(f"the text is shorter than one window of {window} tokens")
    return torch.tensor(rows, dtype=torch.long)
