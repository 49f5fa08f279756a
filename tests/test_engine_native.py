"""The compiled packed-llama layers: the prefill loop gives bitwise the Python loop's results, the fused decode
loop the same within float rounding (and the same greedy tokens); both fall back cleanly."""

import pytest
import torch

from workbench.engine import native
from workbench.engine.backends import PackedLlamaBackend
from workbench.models.tiny import build_tiny


def _run(backend, ids, mask, steps=3):
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = backend.new_cache(ids.shape[0], ids.shape[1] + steps)
    out = [backend.forward(ids, mask, pos, cache, all_positions=True)]
    for _ in range(steps):
        nxt = out[-1][:, -1:].argmax(-1) if out[-1].dim() == 3 else out[-1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = pos[:, -1:] + 1
        out.append(backend.forward(nxt, mask, pos, cache))
    return out, cache


@pytest.mark.skipif(native.disabled(), reason="DAERT_NO_NATIVE is set")
@pytest.mark.parametrize("kind", ["llama", "llama-mha"])
def test_native_layers_equal_python(kind):
    if kind == "llama-mha":  # heads == kv_heads (no grouped-query sharing)
        from transformers import AutoModelForCausalLM

        cfg = build_tiny("llama")[0].config
        cfg.num_key_value_heads = cfg.num_attention_heads
        torch.manual_seed(3)
        model = AutoModelForCausalLM.from_config(cfg).eval()
    else:
        model, _ = build_tiny("llama")
    py, nat = PackedLlamaBackend(model, native=False), PackedLlamaBackend(model, native=True)
    assert py.native is None and nat.native is not None
    ids = torch.randint(5, 250, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[2, :1] = 0
    (a, ca), (b, cb) = _run(py, ids, mask, steps=6), _run(nat, ids, mask, steps=6)
    torch.testing.assert_close(b[0], a[0], rtol=1e-5, atol=1e-5)  # 9 new tokens: the fused loop, causal
    for x, y in zip(a[1:], b[1:], strict=True):  # decode: fused loops, float rounding only
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)
        assert torch.equal(x.argmax(-1), y.argmax(-1))
    torch.testing.assert_close(cb.k, ca.k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cb.v, ca.v, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(native.disabled(), reason="DAERT_NO_NATIVE is set")
def test_native_long_prefill_bitwise_equal_python(monkeypatch):
    model, _ = build_tiny("llama")
    py, nat = PackedLlamaBackend(model, native=False), PackedLlamaBackend(model, native=True)
    monkeypatch.setattr(PackedLlamaBackend, "FUSED_MAX_TOKENS", 4)  # 9 new tokens: the ATen loop
    ids = torch.randint(5, 250, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    (a, ca), (b, cb) = _run(py, ids, mask, steps=0), _run(nat, ids, mask, steps=0)
    assert torch.equal(a[0], b[0]) and torch.equal(ca.k, cb.k) and torch.equal(ca.v, cb.v)


@pytest.mark.skipif(native.disabled(), reason="DAERT_NO_NATIVE is set")
def test_native_decode_rejects_bad_shapes():
    model, _ = build_tiny("llama")
    nat = PackedLlamaBackend(model, native=True)
    cache = nat.new_cache(2, 8)
    h = torch.zeros(2, 1, model.config.hidden_size)
    D = nat.head_dim
    cos, sin = torch.ones(2, 1, 1, D), torch.zeros(2, 1, 1, D)
    args = (*nat._native_args, cache.k, cache.v, cos, sin)
    with pytest.raises(RuntimeError, match="attention mask"):
        nat.native.decode_layers(h, *args, torch.ones(2, 5, dtype=torch.bool), 0, nat.heads, nat.kv_heads, D, 1e-5)
    with pytest.raises(RuntimeError, match="overflow"):
        nat.native.decode_layers(h, *args, torch.ones(2, 9, dtype=torch.bool), 8, nat.heads, nat.kv_heads, D, 1e-5)
    with pytest.raises(RuntimeError, match="cos/sin"):
        nat.native.decode_layers(h.expand(2, 2, -1), *args, torch.ones(2, 2, dtype=torch.bool), 0, nat.heads,
                                 nat.kv_heads, D, 1e-5)


def test_native_refused_with_biases_and_disabled(monkeypatch):
    from transformers import AutoModelForCausalLM

    model, _ = build_tiny("llama")
    cfg = model.config
    cfg.attention_bias = True
    biased = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match="biases"):
        PackedLlamaBackend(biased, native=True)
    assert PackedLlamaBackend(biased).native is None  # auto: the Python loop
    monkeypatch.setenv("DAERT_NO_NATIVE", "1")
    assert PackedLlamaBackend(model).native is None
    with pytest.raises(ValueError, match="disabled"):
        PackedLlamaBackend(model, native=True)


def test_engine_takes_a_backend_instance():
    from workbench.engine import Engine, GenerationConfig

    model, tok = build_tiny("llama")
    cfg = GenerationConfig(max_new_tokens=6)
    ref = Engine(model, tok, threads=None).generate(["hello there"], cfg)[0].token_ids
    eng = Engine(model, tok, threads=None, backend=PackedLlamaBackend(model, native=False))
    assert eng.generate(["hello there"], cfg)[0].token_ids == ref
    other, _ = build_tiny("llama", seed=1)
    with pytest.raises(ValueError, match="another model"):
        Engine(model, tok, backend=PackedLlamaBackend(other))


@pytest.mark.skipif(native.disabled(), reason="DAERT_NO_NATIVE is set")
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 13, 16, 17, 40])
def test_skinny_linear_equals_matmul(rows):
    """x @ w.T: the skinny kernel (<= 16 rows; 1 row, 6-row blocks, tails in K and N) and ATen beyond."""
    mod = native.load("packed_llama")
    g = torch.Generator().manual_seed(rows)
    for k, n in [(64, 96), (37, 11), (576, 7), (8, 1)]:
        x, w = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g)
        torch.testing.assert_close(mod.skinny_linear(x, w), x @ w.T, rtol=1e-5, atol=1e-4)
    wide = torch.randn(rows, 80, generator=g)
    w = torch.randn(9, 40, generator=g)
    torch.testing.assert_close(mod.skinny_linear(wide[:, ::2], w), wide[:, ::2] @ w.T, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(native.disabled(), reason="DAERT_NO_NATIVE is set")
def test_avx512_build_equals_avx2_build():
    """The default build takes the AVX-512 paths exactly where the CPU has AVX-512 (VNNI, BF16 where present), and
    computes what the AVX2 build (-DDAERT_NO_AVX512=1) computes: bitwise for q8 (VNNI sums the same byte products),
    within float32 summation for the float formats and bf16 activations."""
    from workbench.cpu import cpu_flags
    from workbench.engine.weights import kernel_args, quantize

    default, avx2 = native.load("packed_llama"), native.load("packed_llama", {"DAERT_NO_AVX512": 1})
    flags = cpu_flags()
    isa = dict(default.isa())
    # each path implies the CPU has it (an older compiler may leave a path out)
    assert not isa["avx512"] or {"avx512f", "avx512bw", "avx512vl"} <= flags
    assert not isa["vnni"] or (isa["avx512"] and "avx512_vnni" in flags)
    assert not isa["avx512_bf16"] or (isa["avx512"] and "avx512_bf16" in flags)
    assert not any(dict(avx2.isa())[k] for k in ("avx512", "vnni", "avx512_bf16"))
    builds = {"default": default}
    if isa["avx512"]:  # the 512-bit float build, compared too (elsewhere it is the same code as the default)
        builds["zmm"] = native.load("packed_llama", {"DAERT_FLOAT_BITS": 512})
        assert dict(builds["zmm"].isa())["vector_bits"] == 512
    g = torch.Generator().manual_seed(0)
    w = torch.randn(70, 576, generator=g)
    for rows in (1, 7):
        x = torch.randn(rows, 576, generator=g)
        for fmt, low in (("fp32", False), ("bf16", False), ("bf16", True), ("fp16", False), ("int8", False),
                         ("int8", True), ("q4", False), ("q4", True)):
            args = kernel_args(quantize(w, fmt))
            b = avx2.skinny_linear(x, *args, low)
            for name, mod in builds.items():
                a = mod.skinny_linear(x, *args, low)
                if low and fmt != "bf16":
                    assert torch.equal(a, b), (name, fmt, rows)
                else:
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item(),
                                               msg=(name, fmt, rows))


@pytest.mark.skipif(native.disabled(), reason="DAERT_NO_NATIVE is set")
def test_skinny_linear_rejects_bad_input():
    mod = native.load("packed_llama")
    with pytest.raises(RuntimeError, match="columns"):
        mod.skinny_linear(torch.zeros(2, 8), torch.zeros(3, 9))
    with pytest.raises(RuntimeError, match="float32"):
        mod.skinny_linear(torch.zeros(2, 8, dtype=torch.float64), torch.zeros(3, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="contiguous"):
        mod.skinny_linear(torch.zeros(2, 8), torch.zeros(8, 3).t())


def test_load_with_defines_is_a_build_of_its_own(monkeypatch):
    """``defines`` reach the compiler as -D flags, under a module name of their own, and do not touch the default
    build; a failed variant is remembered under its own key."""
    import torch.utils.cpp_extension as ext

    calls = []

    def fake_build(name, sources, extra_cflags, extra_ldflags, verbose):
        calls.append((name, list(extra_cflags)))
        if "DAERT_PF_16=7" in " ".join(extra_cflags):
            raise RuntimeError("no compiler")
        return object()

    monkeypatch.delenv("DAERT_NO_NATIVE", raising=False)
    monkeypatch.setattr(ext, "load", fake_build)
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_failed", {})
    a = native.load("packed_llama", {"DAERT_PF_F32": 1024})
    assert a is not None and native.load("packed_llama", {"DAERT_PF_F32": 1024}) is a  # cached
    assert native.load("packed_llama") is not a
    (n1, f1), (n2, f2) = calls
    assert "-DDAERT_PF_F32=1024" in f1 and not any(f.startswith("-D") for f in f2) and n1 != n2
    assert n2.startswith("daert_packed_llama_") and "pf_f32_1024" in n1
    with pytest.warns(UserWarning, match="unavailable"):
        assert native.load("packed_llama", {"DAERT_PF_16": 7}) is None
    assert native.failure("packed_llama") is None and len(native._failed) == 1
