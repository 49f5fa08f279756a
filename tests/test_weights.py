"""Low-precision weight formats of the packed backend (bf16, int8 with row scales): the stored forms, the C++
skinny kernel against the dequantized weights, the fused decode loop against the Python loop on the same
weights, interventions on every format, and the refusals (tiny random Llama)."""

from __future__ import annotations

import pytest
import torch

from workbench.engine import Engine
from workbench.engine.backends import PackedLlamaBackend
from workbench.engine.config import GREEDY, GenerationConfig
from workbench.engine.weights import FORMATS, quantize
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
    q = quantize(w, "int8")
    assert q.stored.dtype == torch.int8 and q.scale.shape == (37,)
    assert ((q.dequantized - w).abs() <= q.scale[:, None] / 2 + 1e-7).all()
    assert (q.stored.abs().amax(1) == 127).all()  # each row's absmax maps to 127
    assert quantize(w, "fp32").stored is not None and torch.equal(quantize(w, "fp32").dequantized, w)
    with pytest.raises(KeyError, match="unknown weight format 'fp16'"):
        quantize(w, "fp16")


@pytest.mark.parametrize("fmt", LOW)
@pytest.mark.parametrize("rows", [1, 3, 7, 16])
def test_skinny_kernel_equals_dequantized_matmul(tiny, fmt, rows):
    be = native(tiny[0])
    w = torch.randn(45, 67)
    q = quantize(w, fmt)
    x = torch.randn(rows, 67)
    got = be.native.skinny_linear(x, q.stored, q.scale)
    torch.testing.assert_close(got, x @ q.dequantized.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="at most 16 rows"):
        be.native.skinny_linear(torch.randn(17, 67), q.stored, q.scale)


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
    import copy

    peft = pytest.importorskip("peft")
    from workbench.lora import AdapterRegistry

    model, tok = tiny
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    peft.get_peft_model(copy.deepcopy(model), cfg).save_pretrained(tmp_path / "a")
    reg = AdapterRegistry(model)
    reg.add("a", tmp_path / "a")
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
