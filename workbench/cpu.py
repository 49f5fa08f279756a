"""What this CPU does fast: bfloat16 matmuls need AVX-512-BF16 or AMX on x86; without them torch emulates bf16
and an autocast forward is several times slower than float32. Also how many physical
cores this process may run on."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
from collections.abc import Iterable, Mapping
from pathlib import Path

log = logging.getLogger(__name__)


def _cpuinfo(*keys: str) -> str | None:
    """The value of the first /proc/cpuinfo line starting with one of ``keys`` (None where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(keys):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> set[str]:
    """The instruction-set flags of /proc/cpuinfo (empty where it cannot be read)."""
    return set((_cpuinfo("flags", "Features") or "").split())  # x86 / ARM


def cpu_name() -> str:
    """The CPU's model name, for benchmark records."""
    return _cpuinfo("model name") or platform.processor() or "unknown CPU"


# the widest x86 vector extensions, widest first: (flag, name in benchmark records)
_X86_VECTOR = (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16"), ("avx512_vnni", "AVX-512 VNNI"),
               ("avx512f", "AVX-512"), ("avx2", "AVX2"))


def vector_isa(flags: set[str] | None = None) -> str | None:
    """The widest x86 vector extension this CPU reports (e.g. ``"AVX-512 BF16"``), for benchmark records; None
    elsewhere or without any of them."""
    flags = cpu_flags() if flags is None else flags
    return next((name for flag, name in _X86_VECTOR if flag in flags), None)


def fast_bf16(flags: set[str] | None = None) -> bool:
    """True if bfloat16 matmuls run natively on this CPU (x86: avx512_bf16 or amx_bf16; ARM: bf16)."""
    flags = cpu_flags() if flags is None else flags
    if platform.machine() in ("aarch64", "arm64"):
        return "bf16" in flags
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def count_cores(cpus: Iterable[int], topology: Mapping[int, tuple[int, int]]) -> int:
    """The number of physical cores among logical ``cpus``, given ``topology``: CPU -> (package id, core id).

    A CPU missing from ``topology`` counts as a core of its own; the result is at least 1.
    """
    cpus = set(cpus)
    cores = {topology[c] for c in cpus if c in topology}
    return max(1, len(cores) + len(cpus - topology.keys()))


def parse_cpuinfo_topology(text: str) -> dict[int, tuple[int, int]]:
    """CPU -> (physical id, core id) from the text of /proc/cpuinfo (CPUs without both ids are left out)."""
    topology = {}
    for block in text.split("\n\n"):
        fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in block.splitlines() if ":" in line)}
        try:
            topology[int(fields["processor"])] = (int(fields["physical id"]), int(fields["core id"]))
        except (KeyError, ValueError):
            continue
    return topology


def _read_topology(cpus: set[int]) -> dict[int, tuple[int, int]]:
    """CPU -> (package id, core id) for ``cpus``, from sysfs, else /proc/cpuinfo (unreadable CPUs left out)."""
    topology = {}
    for c in cpus:
        d = Path(f"/sys/devices/system/cpu/cpu{c}/topology")
        with contextlib.suppress(OSError, ValueError):
            topology[c] = (int((d / "physical_package_id").read_text()), int((d / "core_id").read_text()))
    missing = cpus - topology.keys()
    if missing:
        try:
            info = parse_cpuinfo_topology(Path("/proc/cpuinfo").read_text())
        except OSError:
            info = {}
        topology.update({c: info[c] for c in missing if c in info})
    return topology


def physical_cores() -> int:
    """The number of physical cores this process may run on: its CPU affinity with hyperthreads collapsed.

    Where the topology cannot be read, the number of logical CPUs it may run on; at least 1.
    """
    try:
        cpus = os.sched_getaffinity(0)
    except (AttributeError, OSError):  # not Linux
        cpus = set(range(os.cpu_count() or 1))
    topology = _read_topology(cpus)
    if len(topology) < len(cpus):
        log.debug("CPU topology unknown for %d of %d CPUs; counting them as cores", len(cpus) - len(topology), len(cpus))
    return count_cores(cpus, topology)
