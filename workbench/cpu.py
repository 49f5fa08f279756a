"""What this CPU does fast: bfloat16 matmuls need AVX-512-BF16 or AMX on x86; without them torch emulates bf16
and an autocast forward is several times slower than float32 (seen on an AVX2-only VM)."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_flags() -> set[str]:
    """The instruction-set flags of /proc/cpuinfo (empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):  # x86 / ARM
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def fast_bf16(flags: set[str] | None = None) -> bool:
    """True if bfloat16 matmuls run natively on this CPU (x86: avx512_bf16 or amx_bf16; ARM: bf16)."""
    flags = cpu_flags() if flags is None else flags
    if platform.machine() in ("aarch64", "arm64"):
        return "bf16" in flags
    return bool({"avx512_bf16", "amx_bf16"} & flags)
