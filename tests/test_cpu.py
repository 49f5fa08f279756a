"""bfloat16 is chosen only where the CPU runs it natively; physical cores are counted from the topology."""

import os
import platform

import pytest

from workbench.cpu import (
    count_cores,
    cpu_flags,
    fast_bf16,
    parse_cpuinfo_topology,
    physical_cores,
    vector_isa,
)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 flag names")
def test_fast_bf16_needs_native_instructions():
    assert not fast_bf16({"avx2", "fma", "avx512f"})  # AVX-512 without BF16: emulated
    assert fast_bf16({"avx2", "avx512f", "avx512_bf16"})
    assert fast_bf16({"amx_tile", "amx_bf16"})
    assert fast_bf16() == bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def test_vector_isa_names_the_widest_extension():
    assert vector_isa({"sse4_2", "avx2", "fma"}) == "AVX2"
    assert vector_isa({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}) == "AVX-512 BF16"
    assert vector_isa({"avx2", "avx512f"}) == "AVX-512"
    assert vector_isa({"avx512f", "amx_tile", "amx_bf16", "avx512_bf16"}) == "AMX"
    assert vector_isa({"neon", "asimd"}) is None


HYPERTHREADED = {0: (0, 0), 1: (0, 1), 2: (0, 0), 3: (0, 1)}  # 2 cores x 2 hyperthreads, Linux numbering


def test_count_cores_collapses_hyperthreads():
    assert count_cores({0, 1, 2, 3}, HYPERTHREADED) == 2


def test_count_cores_two_sockets():
    # core ids repeat across sockets: 2 sockets x 2 cores x 2 hyperthreads
    topology = {c: (c // 4, c % 2) for c in range(8)}
    assert count_cores(range(8), topology) == 4
    assert count_cores({0, 4}, topology) == 2


def test_count_cores_affinity_subset():
    assert count_cores({0, 2}, HYPERTHREADED) == 1  # siblings of one core
    assert count_cores({0, 1}, HYPERTHREADED) == 2


def test_count_cores_without_topology():
    assert count_cores({0, 1, 2}, {}) == 3
    assert count_cores({0, 1, 2, 3}, {0: (0, 0), 2: (0, 0)}) == 3  # CPUs 1 and 3 unknown: a core each
    assert count_cores(set(), {}) == 1


def test_parse_cpuinfo_topology():
    blocks = [f"processor\t: {c}\nvendor_id\t: X\nphysical id\t: {p}\ncore id\t\t: {k}\n"
              for c, (p, k) in HYPERTHREADED.items()]
    text = "\n".join(blocks) + "\nprocessor\t: 4\nmodel name\t: no topology\n"
    assert parse_cpuinfo_topology(text) == HYPERTHREADED
    assert parse_cpuinfo_topology("processor\t: 0\nFeatures\t: fp asimd\n") == {}


def test_physical_cores(monkeypatch):
    import workbench.cpu as cpu

    assert 1 <= physical_cores() <= (os.cpu_count() or 1)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(cpu, "_read_topology", lambda cpus: {c: HYPERTHREADED[c] for c in cpus})
    assert physical_cores() == 2
    monkeypatch.setattr(cpu, "_read_topology", lambda cpus: {})
    assert physical_cores() == 4
