"""bfloat16 is chosen only where the CPU runs it natively."""

import platform

import pytest

from workbench.cpu import cpu_flags, fast_bf16


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 flag names")
def test_fast_bf16_needs_native_instructions():
    assert not fast_bf16({"avx2", "fma", "avx512f"})  # AVX-512 without BF16: emulated
    assert fast_bf16({"avx2", "avx512f", "avx512_bf16"})
    assert fast_bf16({"amx_tile", "amx_bf16"})
    assert fast_bf16() == bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
