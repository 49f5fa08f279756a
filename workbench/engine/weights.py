"""Weight formats of the packed backend: what its decode matmuls stream, kept apart from the model's parameters.

- ``fp32``: the model's own values (the only format for which greedy output equals HF's exactly);
- ``bf16``: bfloat16 (the top 16 bits of each float32, rounded to nearest even);
- ``fp16``: IEEE float16 (rounded to nearest even; GGUF's F16), widened with F16C's ``vcvtph2ps`` on x86: the
  16-bit format to pick where bfloat16 is not native (see :func:`workbench.cpu.fast_bf16`);
- ``int8``: symmetric int8 with one float32 scale per output row, ``w ~ q * absmax(row) / 127`` (per-channel
  weight quantization as in LLM.int8()'s weight path, Dettmers et al. 2022, without outlier handling);
- ``q4``: 4 bits with a scale and a minimum per block of 32 inputs, ``w ~ d * q + m`` with ``q`` in 0..15,
  ``m`` the block's minimum and ``d`` its range / 15: GGUF's Q4_1 block (nibble order included), with float32
  ``d`` and ``m``. :func:`from_gguf_q4_1` takes a GGUF file's Q4_1 blocks as they are.

:func:`quantize` returns the stored form and its float32 dequantized copy: the C++ skinny kernel streams the stored
form (decode steps; :func:`kernel_args` gives its layout), prefills and steps of more than 16 rows multiply by the
dequantized copy (oneDNN or ATen, :data:`PREFILLS`), so both run the same weights and differ only in float
rounding. With ``q8``
activations (``int8`` and ``q4``) the skinny kernel also rounds its inputs to int8 blocks
(:func:`quantize_activations_q8`; the math in :func:`q8_linear_reference`). With ``bf16`` activations (``bf16``
weights) it rounds them to bfloat16 (:func:`bf16_linear_reference`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.errors import UnknownNameError

FORMATS = ("fp32", "bf16", "fp16", "int8", "q4")
# what the skinny kernel multiplies the weights with: float32, int8 blocks (q8: int8 and q4 weights only) or bfloat16
# (bf16: bf16 weights only; AVX-512 BF16 dot products where the CPU has them)
ACTIVATIONS = ("fp32", "q8", "bf16")
# each low-precision activation format: the weight formats it takes, and how it multiplies them
LOW_ACTIVATIONS = {"q8": (("int8", "q4"), "int8 or q4 weights with integer dot products"),
                   "bf16": (("bf16",), "bf16 weights with bfloat16 dot products")}
# the GEMM of prefills past the fused decode loop: ATen's F.linear (fp32: HF's own call, HF's bits) or oneDNN on
# copies of the matrices reordered once (faster; float rounding of its own; one more float32 copy of the layers)
PREFILLS = ("aten", "onednn")
Q4_BLOCK = 32


@dataclass(frozen=True)
class Quantized:
    stored: torch.Tensor  # what the skinny kernel reads: float32, bfloat16, float16 or int8 [out, in]; q4: uint8 [out, in/2]
    scale: torch.Tensor | None  # int8: float32 [out]; q4: float32 (d, m) per block [out, in/32, 2]
    dequantized: torch.Tensor  # float32 [out, in]: the weights this format computes with


def check_activations(name: str, weights: str) -> str:
    if name not in ACTIVATIONS:
        raise UnknownNameError("activation format", name, list(ACTIVATIONS))
    takes, how = LOW_ACTIVATIONS.get(name, ((weights,), ""))
    if weights not in takes:
        raise ValueError(f"activations={name!r} multiplies {how}; weights={weights!r} does not")
    return name


def quantize_activations_q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``x`` [M, K] as the ``q8`` activations the C++ kernel computes with: per block of 32, ``dx = absmax
    / 127`` and ``qx = round(x / dx)`` (half to even) in -127..127, as llama.cpp's Q8_0 / Q8_1 activations.
    Returns ``(qx int8 [M, K], dx float32 [M, K / 32])``."""
    M, K = x.shape
    if K % Q4_BLOCK:
        raise ValueError(f"q8 activations come in blocks of {Q4_BLOCK}; got {K} columns")
    b = x.float().reshape(M, K // Q4_BLOCK, Q4_BLOCK)
    d = b.abs().amax(-1) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(b * inv[..., None]).to(torch.int8)
    return q.reshape(M, K), d


def q8_linear_reference(x: torch.Tensor, q: Quantized) -> torch.Tensor:
    """``x @ w.T`` as the skinny kernel computes it with ``q8`` activations, in float64: per block, the exact
    integer dot product times the scales (int8: the row scale times dx; q4: ``d * dx * sum(qx q) + m *
    sum(x)``, the minimum's term on the unrounded block sum of x)."""
    qx, dx = quantize_activations_q8(x)
    M, K = x.shape
    nb = K // Q4_BLOCK
    xb = qx.double().reshape(M, 1, nb, Q4_BLOCK)
    if q.stored.dtype == torch.int8:
        wb = q.stored.double().reshape(1, -1, nb, Q4_BLOCK)
        return ((xb * wb).sum(-1) * dx.double()[:, None]).sum(-1) * q.scale.double()
    if q.stored.dtype != torch.uint8:
        raise ValueError(f"q8 activations multiply int8 or q4 weights, not {q.stored.dtype}")
    N = q.stored.shape[0]
    wq = _q4_codes(q.stored, N, nb).double().reshape(1, N, nb, Q4_BLOCK)
    d, m = q.scale[..., 0].double(), q.scale[..., 1].double()
    xsum = x.double().reshape(M, 1, nb, Q4_BLOCK).sum(-1)
    return ((xb * wq).sum(-1) * d * dx.double()[:, None] + m * xsum).sum(-1)


def bf16_linear_reference(x: torch.Tensor, q: Quantized) -> torch.Tensor:
    """``x @ w.T`` as the skinny kernel computes it with ``bf16`` activations, in float64: ``x`` rounded to
    bfloat16 (nearest even) times the bfloat16 weights. Each product is exact in float32, so the kernel differs from
    this only by its float32 summation."""
    if q.stored.dtype != torch.bfloat16:
        raise ValueError(f"bf16 activations multiply bf16 weights, not {q.stored.dtype}")
    return x.bfloat16().double() @ q.stored.double().T


def resolve_prefill(name: str | None, weights: str) -> str:
    """The prefill GEMM for ``name`` (None: ``aten`` for fp32, ``onednn`` for the other formats where torch has
    oneDNN)."""
    onednn = torch.backends.mkldnn.is_available()
    if name is None:
        return "onednn" if weights != "fp32" and onednn else "aten"
    if name not in PREFILLS:
        raise UnknownNameError("prefill GEMM", name, list(PREFILLS))
    if name == "onednn" and not onednn:
        raise ValueError("prefill='onednn' needs a torch built with oneDNN (torch.backends.mkldnn); use 'aten'")
    return name


def check_format(name: str) -> str:
    if name not in FORMATS:
        raise UnknownNameError("weight format", name, list(FORMATS))
    return name


@torch.no_grad()
def quantize(w: torch.Tensor, fmt: str) -> Quantized:
    """``w`` [out, in] (float32) in format ``fmt``."""
    check_format(fmt)
    w = w.detach().float().contiguous()
    if fmt == "fp32":
        return Quantized(w, None, w)
    if fmt in ("bf16", "fp16"):
        q = w.to(torch.bfloat16 if fmt == "bf16" else torch.float16).contiguous()
        return Quantized(q, None, q.float())
    if fmt == "q4":
        return _quantize_q4(w)
    scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
    return Quantized(q, scale.contiguous(), q.float() * scale[:, None])


Q4_KERNEL_BYTES = 24  # a q4 block as the C++ kernel streams it: float32 d, float32 m, 16 bytes of nibbles


def kernel_args(q: Quantized) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(w, scale)`` as the C++ skinny kernel takes them: the stored form and its row scales, or for ``q4`` the
    blocks with their (d, m) interleaved, ``[out, in / 32 * 24]`` bytes, so that each row is one sequential
    stream (no separate scale tensor)."""
    if q.stored.dtype != torch.uint8:
        return q.stored, q.scale
    N, nb = q.scale.shape[:2]
    dm = q.scale.contiguous().view(torch.uint8).reshape(N, nb, 8)
    return torch.cat([dm, q.stored.reshape(N, nb, 16)], -1).reshape(N, nb * Q4_KERNEL_BYTES).contiguous(), None


def nbytes(q: Quantized) -> int:
    return q.stored.nbytes + (q.scale.nbytes if q.scale is not None else 0)


def _pack_q4(q: torch.Tensor, dm: torch.Tensor) -> Quantized:
    """``q`` [N, nb, 32] integers in 0..15, ``dm`` [N, nb, 2] float32 -> the stored form (GGUF's nibble order:
    byte j of a block holds element j in its low and element 16 + j in its high nibble)."""
    N, nb, _ = q.shape
    q8 = q.to(torch.uint8)
    packed = (q8[..., :16] | (q8[..., 16:] << 4)).reshape(N, nb * 16).contiguous()
    return Quantized(packed, dm.contiguous(), dequantize_q4(packed, dm))


def dequantize_q4(packed: torch.Tensor, dm: torch.Tensor) -> torch.Tensor:
    """The float32 weights [N, K] of the stored ``q4`` form (``d * q + m``, GGUF's dequantization)."""
    N, nb = dm.shape[:2]
    q = _q4_codes(packed, N, nb).float()
    return (q * dm[..., :1] + dm[..., 1:]).reshape(N, nb * Q4_BLOCK).contiguous()


def _q4_codes(packed: torch.Tensor, N: int, nb: int) -> torch.Tensor:
    """The 4-bit codes ``q`` [N, nb, 32] (uint8, 0..15) of the stored ``q4`` form, in element order."""
    b = packed.view(N, nb, 16)
    return torch.cat([b & 0x0F, b >> 4], -1)


def _quantize_q4(w: torch.Tensor) -> Quantized:
    N, K = w.shape
    if K % Q4_BLOCK:
        raise ValueError(f"weights='q4' needs input sizes that are multiples of {Q4_BLOCK}; a matrix has {K}")
    b = w.view(N, K // Q4_BLOCK, Q4_BLOCK)
    lo, hi = b.amin(-1, keepdim=True), b.amax(-1, keepdim=True)
    d = (hi - lo) / 15.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round((b - lo) * inv).clamp_(0, 15)
    return _pack_q4(q, torch.cat([d, lo], -1))


def q4_1_blocks(raw: torch.Tensor | bytes, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A GGUF Q4_1 tensor's blocks (20 bytes each: float16 d, float16 m, 16 bytes of nibbles), ``rows`` x ``cols``
    in GGUF's row order, as the ``q4`` format's ``(stored, dm)``: the nibbles as they are, d and m widened."""
    if cols % Q4_BLOCK:
        raise ValueError(f"Q4_1 rows hold whole blocks of {Q4_BLOCK}; got {cols} columns")
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if isinstance(raw, bytes | bytearray) else raw
    if data.dtype != torch.uint8:
        raise ValueError(f"Q4_1 blocks are raw bytes (uint8), got {data.dtype}")
    nb = cols // Q4_BLOCK
    if data.numel() != rows * nb * 20:
        raise ValueError(f"Q4_1 data of {data.numel()} bytes does not hold {rows} x {cols} weights")
    blocks = data.reshape(rows, nb, 20)
    dm = blocks[..., :4].contiguous().view(torch.float16).float()  # [rows, nb, 2]: d, m
    return blocks[..., 4:].reshape(rows, nb * 16).contiguous(), dm.contiguous()


def from_gguf_q4_1(raw: torch.Tensor | bytes, rows: int, cols: int) -> Quantized:
    """:func:`q4_1_blocks` with the dequantized weights."""
    stored, dm = q4_1_blocks(raw, rows, cols)
    return Quantized(stored, dm, dequantize_q4(stored, dm))

