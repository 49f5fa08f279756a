"""What this CPU does fast: bfloat16 matmuls need AVX-512-BF16 or AMX on x86; without them torch emulates bf16
and an autocast forward is several times slower than float32 (seen on an AVX2-only VM)."""

from __future__ import annotations

import platform
from pathlib import Path


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


def fast_bf16(flags: set[str] | None = None) -> bool:
    """True if bfloat16 matmuls run natively on this CPU (x86: avx512_bf16 or amx_bf16; ARM: bf16)."""
    flags = cpu_flags() if flags is None else flags
    if platform.machine() in ("aarch64", "arm64"):
        return "bf16" in flags
    return bool({"avx512_bf16", "amx_bf16"} & flags)
