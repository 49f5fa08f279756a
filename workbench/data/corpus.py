"""Real English text available offline, by exact source name.

Named sources read files installed by Debian packages (``apt-get install dict-gcide dict-jargon
dict-devil fortunes``; ``scripts/setup.sh`` does it) or shipped with every Debian system
(``/usr/share/common-licenses``). Besides the names:

- ``file:PATH`` (or ``PATH`` of an existing file or folder): UTF-8 text; a folder reads every ``*.txt``;
- ``hf:DATASET[:CONFIG]:SPLIT[:FIELD]``: a Hugging Face dataset (needs network and ``datasets``).

Each source yields *documents* (one dictionary entry, one fortune, one license); the window
builder joins them with the tokenizer's EOS token.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from workbench.errors import CorpusUnavailableError, UnknownNameError


def share_root() -> Path:
    """Root of the Debian data files (overridable with ``DAERT_SHARE_ROOT``, used by tests)."""
    return Path(os.environ.get("DAERT_SHARE_ROOT", "/usr/share"))


@dataclass(frozen=True)
class CorpusSource:
    name: str
    description: str
    debian_package: str | None
    reader: Callable[[Path], Iterator[str]]  # gets share_root(), yields documents


# --- readers ---------------------------------------------------------------------------------------

_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _b64num(s: str) -> int:
    # dictd's index stores offsets/lengths as base-64 numbers (most significant digit first).
    n = 0
    for c in s:
        n = n * 64 + _B64[c]
    return n


def _dictd_entries(root: Path, db: str) -> Iterator[str]:
    """Entries of a dictd database (``.index`` + gzip-compatible ``.dict.dz``), metadata entries skipped."""
    index, data = root / "dictd" / f"{db}.index", root / "dictd" / f"{db}.dict.dz"
    _require(index, data)
    with gzip.open(data) as f:  # dictzip is gzip-compatible
        raw = f.read()
    spans, meta = set(), set()
    for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        span = (_b64num(parts[1]), _b64num(parts[2]))
        # Database metadata lives under 00-database-* headwords, sometimes aliased (00-gcide-url, ...).
        (meta if parts[0].startswith(("00-database", "00database")) else spans).add(span)
    for off, length in sorted(spans - meta):
        text = raw[off : off + length].decode("utf-8", errors="replace")
        text = text.strip()
        if text:
            yield text


def _fortunes(root: Path) -> Iterator[str]:
    folder = root / "games" / "fortunes"
    _require(folder)
    # Plain fortune files only: skip the .dat indexes, the .u8 symlinks and the offensive off/ folder.
    for f in sorted(folder.iterdir()):
        if f.is_file() and not f.is_symlink() and f.suffix not in (".dat", ".u8"):
            for doc in f.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
                doc = doc.strip().strip("%").strip()
                if doc:
                    yield doc


def _licenses(names: tuple[str, ...] | None) -> Callable[[Path], Iterator[str]]:
    def read(root: Path) -> Iterator[str]:
        folder = root / "common-licenses"
        _require(folder)
        files = [folder / n for n in names] if names else sorted(p for p in folder.iterdir() if p.is_file())
        _require(*files)
        for f in files:
            yield f.read_text(encoding="utf-8", errors="replace").strip()

    return read


def _require(*paths: Path) -> None:
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(p)


SOURCES: dict[str, CorpusSource] = {
    s.name: s
    for s in (
        CorpusSource("gpl-3", "GNU GPL version 3 (≈7.7k SmolLM2 tokens)", None, _licenses(("GPL-3",))),
        CorpusSource("common-licenses", "every text in /usr/share/common-licenses", None, _licenses(None)),
        CorpusSource("gcide", "GNU Collaborative International Dictionary of English (Webster 1913)",
                     "dict-gcide", lambda r: _dictd_entries(r, "gcide")),
        CorpusSource("jargon", "The Jargon File", "dict-jargon", lambda r: _dictd_entries(r, "jargon")),
        CorpusSource("devil", "Ambrose Bierce, The Devil's Dictionary", "dict-devil",
                     lambda r: _dictd_entries(r, "devil")),
        CorpusSource("fortunes", "fortune cookies (non-offensive set)", "fortunes", _fortunes),
    )
}


# --- public API ------------------------------------------------------------------------------------


def list_sources() -> list[CorpusSource]:
    return list(SOURCES.values())


def iter_documents(source: str) -> Iterator[str]:
    """Yield the documents of ``source`` (a registry name, ``file:PATH``, a path, or ``hf:...``)."""
    if source in SOURCES:
        spec = SOURCES[source]
        try:
            yield from spec.reader(share_root())
        except FileNotFoundError as e:
            how = (f"install it with: apt-get install {spec.debian_package}" if spec.debian_package
                   else "it ships with Debian's base-files package")
            raise CorpusUnavailableError(f"corpus {source!r} is not available here ({e.args[0]} missing); {how}") from e
        return
    if source.startswith("hf:"):
        yield from _hf_documents(source)
        return
    path = Path(source[5:] if source.startswith("file:") else source).expanduser()
    if source.startswith("file:") or path.exists():
        yield from _file_documents(path)
        return
    raise UnknownNameError("corpus", source, list(SOURCES),
                           hint="Also accepted: file:PATH, an existing path, hf:DATASET[:CONFIG]:SPLIT[:FIELD].")


def load_documents(source: str, max_documents: int | None = None) -> list[str]:
    docs = []
    for doc in iter_documents(source):
        docs.append(doc)
        if max_documents is not None and len(docs) >= max_documents:
            break
    return docs


def _file_documents(path: Path) -> Iterator[str]:
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise CorpusUnavailableError(f"folder {path} has no *.txt files")
    elif path.is_file():
        files = [path]
    else:
        raise CorpusUnavailableError(f"no such file or folder: {path}")
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            yield text


def _hf_documents(source: str) -> Iterator[str]:
    parts = source[3:].split(":")
    if len(parts) not in (2, 3, 4):
        raise ValueError(f"bad hf source {source!r}; expected hf:DATASET[:CONFIG]:SPLIT[:FIELD]")
    field = "text"
    if len(parts) == 4:
        dataset, config, split, field = parts
    elif len(parts) == 3:
        dataset, config, split = parts
    else:
        (dataset, split), config = parts, None
    try:
        import datasets
    except ImportError as e:
        raise CorpusUnavailableError("hf: sources need the 'datasets' package (pip install datasets)") from e
    try:
        ds = datasets.load_dataset(dataset, config, split=split, streaming=True)
        for row in ds:
            if field not in row:
                raise CorpusUnavailableError(f"dataset {dataset!r} rows have no field {field!r}: {sorted(row)}")
            if row[field]:
                yield row[field]
    except (OSError, ConnectionError) as e:
        raise CorpusUnavailableError(f"could not load {source!r} (needs network access to the hub): {e}") from e
