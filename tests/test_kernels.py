"""Triton kernels vs their torch references. On a machine without CUDA they run in Triton's CPU interpreter
(TRITON_INTERPRET=1, set here before the first launch), so shapes are small and odd."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import stats  # noqa: E402

from workbench.kernels import aot_check, rope, sae_decode, sampling, spec_verify  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy in the interpreter: exp(-inf) etc.
DEV = "cuda" if torch.cuda.is_available() else "cpu"
POISON = {torch.float32: float("nan"), torch.float16: float("nan"), torch.bfloat16: float("nan"),
          torch.int64: -777, torch.int32: -777}


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every tensor the launchers allocate starts as garbage, so an element the kernel forgets shows up."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(POISON.get(t.dtype, 0))

    def empty_like(x, *args, **kwargs):
        t = real_empty_like(x, *args, **kwargs)
        return t.fill_(POISON.get(t.dtype, 0))

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# -- sampling -------------------------------------------------------------------------------------------

# Draws: each is one kernel row, ~35 ms in the CPU interpreter, so few there; the target below is built so that
# 300 draws still cover every kept token (expected >= stats.MIN_SEEN times), i.e. dropping any one of them fails.
N_DRAWS = 20_000 if DEV == "cuda" else 300
SAMPLER_CASES = [
    dict(temperature=0.7, top_p=0.8),
    dict(temperature=1.0, top_k=4),
    dict(temperature=1.3, min_p=0.1),
    dict(temperature=0.9, top_k=6, top_p=0.9, min_p=0.02),
]


def _designed_logits(V=64):
    """Eight head tokens (20% down to 5%) and 56 tail tokens sharing 4%, at random positions (the kernel draws
    in index order), with a little noise so no two are tied. Every filter above keeps 4-8 head tokens, the
    lightest with >= 6.9% of the filtered mass, and drops head tokens of a few % as well as the whole tail."""
    g = gen(1)
    head = torch.tensor([0.2, 0.16, 0.13, 0.11, 0.09, 0.075, 0.06, 0.05])
    q = torch.full((V,), float(1 - head.sum()) / (V - len(head)))
    q[torch.randperm(V, generator=g)[: len(head)]] = head
    return q.log() + 0.05 * torch.randn(V, generator=g)


@pytest.mark.parametrize("case", SAMPLER_CASES, ids=range(len(SAMPLER_CASES)))
def test_sampler_matches_reference_distribution(case):
    from workbench.engine import SamplingParams
    from workbench.engine import processors as P

    logits = _designed_logits()
    V = logits.numel()
    draws = sampling.sample(logits.to(DEV).expand(N_DRAWS, V), seeds=torch.arange(N_DRAWS, device=DEV),
                            impl="triton", **case)
    probs = sampling.filtered_probs(logits[None], **case)[0]
    if not ("top_k" in case and "top_p" in case):  # where the semantics agree: the engine's processors (= HF's)
        x = P.process(logits[None], [SamplingParams(**case)], torch.zeros(1, V, dtype=torch.bool),
                      torch.zeros(1, V, dtype=torch.int32))
        torch.testing.assert_close(probs, x[0].softmax(-1), rtol=1e-5, atol=1e-7)
    stats.check_draws(torch.bincount(draws.cpu(), minlength=V), probs, all_covered=True)
    # negative control: at this many draws the same checks reject a sampler that loses the lightest kept token
    dropped = stats.assert_detects_a_dropped_token(probs, N_DRAWS)
    assert probs[dropped] == probs[probs > 0].min()


def test_sampler_filters_equal_engine_processors():
    """Where the kernel's filter semantics and the engine's sequential processors agree, the kept sets match."""
    from workbench.engine import SamplingParams
    from workbench.engine import processors as P

    logits = torch.randn(3, 50, generator=gen(2)) * 3
    for kw in [dict(top_p=0.75), dict(top_k=7), dict(min_p=0.05), dict(top_p=0.9, min_p=0.05)]:
        params = [SamplingParams(temperature=0.8, **kw)] * 3
        engine_keep = torch.isfinite(P.process(logits, params, torch.zeros_like(logits, dtype=bool),
                                               torch.zeros_like(logits, dtype=torch.int32)))
        kernel_keep = sampling.filtered_probs(logits, 0.8, kw.get("top_k", 0), kw.get("top_p", 1.0),
                                              kw.get("min_p", 0.0)) > 0
        assert torch.equal(engine_keep, kernel_keep), kw


def test_sampler_rows_greedy_invalid_and_seeds():
    V = 40
    logits = torch.randn(6, V, generator=gen(3), dtype=torch.float32).to(DEV)
    logits[2, 5] = float("nan")
    logits[3] = float("-inf")
    logits[4, 7] = float("inf")
    temp = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 0.5], device=DEV)
    out = sampling.sample(logits, temperature=temp, top_k=torch.tensor([0, 3, 0, 0, 0, 1], dtype=torch.int32),
                          seeds=7, impl="triton")
    assert out[0] == logits[0].argmax() and out[5] == logits[5].argmax()  # greedy row; top-k 1 is greedy too
    assert out[1] in logits[1].topk(3).indices
    assert out[2:5].tolist() == [-1, -1, -1]  # NaN, all -inf, +inf rows: defined, not a crash
    again = sampling.sample(logits, temperature=temp, seeds=7, impl="triton")
    assert torch.equal(sampling.sample(logits, temperature=temp, seeds=7, impl="triton"), again)
    half = logits.half()
    assert sampling.sample(half, temperature=0.0, impl="triton")[0] == half[0].float().argmax()


def test_sampler_reference_agrees_on_invalid_rows():
    logits = torch.randn(3, 9, generator=gen(4))
    logits[1, 0] = float("nan")
    out = sampling.sample(logits, seeds=1, impl="torch")
    assert out[1] == -1 and out[0] >= 0 and out[2] >= 0


@pytest.mark.parametrize("kwargs,msg", [
    (dict(top_p=0.0), "top_p"), (dict(top_k=-1), "top_k"), (dict(min_p=1.5), "min_p"),
    (dict(temperature=-1.0), "temperature"), (dict(seeds=torch.zeros(5, dtype=torch.int64)), "seeds"),
])
def test_sampler_bad_params(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        sampling.sample(torch.randn(3, 9), **kwargs)


def test_sampler_bad_impl_and_shape():
    with pytest.raises(ValueError, match="impl"):
        sampling.sample(torch.randn(2, 9), impl="cuda")
    with pytest.raises(ValueError, match="batch, vocab"):
        sampling.sample(torch.randn(9))


# -- speculative verification -----------------------------------------------------------------------------

def _spec_inputs(B, K, V, point_mass, seed):
    g = gen(seed)
    p = torch.softmax(torch.randn(B, K + 1, V, generator=g) * 2, -1)
    q = None if point_mass else torch.softmax(torch.randn(B, K, V, generator=g) * 2, -1)
    d = p[:, :K].argmax(-1) if point_mass else torch.multinomial(q.reshape(-1, V), 1, generator=g).view(B, K)
    return [t.to(DEV) if t is not None else None
            for t in (d, q, p, torch.rand(B, K, generator=g), torch.rand(B, generator=g))]


@pytest.mark.parametrize("point_mass", [False, True])
def test_verify_equals_reference(point_mass):
    args = _spec_inputs(9, 3, 29, point_mass, seed=5)
    n, toks = spec_verify.verify(*args, impl="triton")
    n_ref, toks_ref = spec_verify.verify_reference(*args)
    assert torch.equal(n, n_ref) and torch.equal(toks, toks_ref)
    assert 0 < n.float().mean() < 3  # both accepting and rejecting paths were exercised


@pytest.mark.parametrize("point_mass", [False, True])
def test_verify_output_is_distributed_as_target(point_mass):
    """Leviathan et al., thm 1: the first emitted token follows the target p whatever the draft. p is flat
    enough (lightest token 5.8%) for 400 draws to cover every token."""
    N, K, V = 400, 2, 7
    g = gen(6)
    p_row = torch.softmax(torch.randn(V, generator=g) * 0.5, -1)
    q_row = torch.softmax(torch.randn(V, generator=g) * 2, -1)
    p = p_row.expand(N, K + 1, V).contiguous()
    if point_mass:
        q, d = None, torch.full((N, K), int(q_row.argmax()))
    else:
        q = q_row.expand(N, K, V).contiguous()
        d = torch.multinomial(q_row, N * K, replacement=True, generator=g).view(N, K)
    _, toks = spec_verify.verify(d.to(DEV), q if q is None else q.to(DEV), p.to(DEV),
                                 torch.rand(N, K, generator=g).to(DEV), torch.rand(N, generator=g).to(DEV),
                                 impl="triton")
    stats.check_draws(torch.bincount(toks[:, 0].cpu(), minlength=V), p_row, all_covered=True)
    stats.assert_detects_a_dropped_token(p_row, N)


def test_verify_bad_inputs():
    d, q, p, ua, us = _spec_inputs(2, 3, 11, False, seed=1)
    with pytest.raises(ValueError, match="K\\+1"):
        spec_verify.verify(d, q, p[:, :3], ua, us)
    with pytest.raises(ValueError, match="draft tokens must be in"):
        spec_verify.verify(d + 100, q, p, ua, us)


# -- RoPE ---------------------------------------------------------------------------------------------------

def _hf_inv_freq(rope_type, **extra):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": rope_type, "rope_theta": 10000.0, **extra}
    cfg = LlamaConfig(hidden_size=48, num_attention_heads=3, max_position_embeddings=64, rope_parameters=params)
    fn = ROPE_INIT_FUNCTIONS[rope_type] if rope_type != "default" else None
    if fn is None:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        return LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    return fn(cfg, "cpu")


@pytest.mark.parametrize("rope_type,extra", [
    ("default", {}), ("linear", {"factor": 4.0}),
    ("yarn", {"factor": 4.0, "original_max_position_embeddings": 16}),
    ("llama3", {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}),
])
def test_rope_equals_hf_with_scaled_frequencies(rope_type, extra):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    inv_freq, factor = _hf_inv_freq(rope_type, **extra)
    B, H, KV, T, D = 2, 3, 1, 5, 16
    g = gen(8)
    q, k = torch.randn(B, H, T, D, generator=g), torch.randn(B, KV, T, D, generator=g)
    pos = torch.randint(0, 200, (B, T), generator=g)
    freqs = pos[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), -1)
    hq, hk = apply_rotary_pos_emb(q, k, emb.cos() * factor, emb.sin() * factor)
    oq, ok = rope.apply_rope(q.to(DEV), k.to(DEV), pos.to(DEV), inv_freq.to(DEV), factor, impl="triton")
    torch.testing.assert_close(oq.cpu(), hq, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ok.cpu(), hk, atol=1e-5, rtol=1e-5)


# Tolerances per dtype, from the rounding they allow. u is the unit roundoff, the relative error of one rounding
# to nearest: bf16 keeps 8 significant bits, u = 2^-8 = 0.0039; fp16 11 bits, 2^-11; fp32 24 bits, 2^-24.
UNIT = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# Both kernels compute in fp32 and round once, at the store: one u. Triton's CPU interpreter truncates instead on
# fp32 -> bf16 (1.0059 stores as 1.0, torch rounds it to 1.0078), up to one ulp = 2u; CUDA rounds to nearest.
STORE_ULPS = {torch.float32: 1, torch.float16: 1, torch.bfloat16: 2 if DEV == "cpu" else 1}


def _assert_one_rounding(out, exact, scale, fp32_ops, dtype):
    """Elementwise ``|out - exact| <= STORE_ULPS * u * |exact| + fp32_ops * 2^-24 * scale``: one rounding of the
    exact value to ``dtype``, plus the fp32 arithmetic before it (a few roundings of terms up to ``scale``)."""
    assert out.dtype == dtype
    err = (out.double() - exact).abs()
    bound = STORE_ULPS[dtype] * UNIT[dtype] * exact.abs() + fp32_ops * 2.0**-24 * scale
    worst = float((err / bound).max())
    assert worst <= 1.0, f"error up to {worst:.2f}x the one-rounding bound"


def _rope_exact(x, pos, inv, factor):
    """The rotation in fp64 of the rounded inputs, at the kernel's fp32 angles (pos 900: the angle's own fp32
    rounding, ~5e-5, is the same for every implementation and not what is tested)."""
    ang = (pos[..., None].float() * inv.float()).double()
    emb = torch.cat((ang, ang), -1)
    cos, sin = (emb.cos() * factor)[:, None], (emb.sin() * factor)[:, None]
    x = x.double()
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rope_kernel_vs_reference_dtypes(dtype):
    g = gen(9)
    q = torch.randn(1, 2, 3, 22, generator=g).to(DEV, dtype)
    k = torch.randn(1, 2, 3, 22, generator=g).to(DEV, dtype)
    pos = torch.tensor([[3, 900, 17]], device=DEV)
    inv = 1.0 / (500.0 ** (torch.arange(0, 22, 2).float() / 22)).to(DEV)
    factor = 1.1
    out = rope.apply_rope(q, k, pos, inv, factor, impl="triton")
    ref = rope.rope_reference(q, k, pos, inv, factor)
    for x, a, b in zip((q, k), out, ref, strict=True):
        half = x.shape[-1] // 2
        pair = (x.double().abs() + x.double().abs().roll(half, -1)) * factor  # |x1| + |x2| of each rotated pair
        # vs the exact rotation: one rounding at the store. Measured (seeds 1-5, 9): bf16 1.95u (the interpreter's
        # truncation), fp16 0.98u, fp32 within 1.2 x 2^-24 x pair, against 4 allowed (a few fp32 operations).
        _assert_one_rounding(a, _rope_exact(x, pos, inv, factor), pair, 4, dtype)
        # vs HF's way (cos/sin rounded to the dtype, two products and a sum in it): ~3u x pair of its own, plus
        # the kernel's rounding; measured max 2.8 u x pair (bf16), 1.9 (fp16), 2.4 (fp32), against 4 allowed
        err = float(((a.double() - b.double()).abs() / pair).max()) / UNIT[dtype]
        assert err <= 4, f"{err:.2f} u x pair"


def test_rope_bad_inputs():
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8)
    with pytest.raises(ValueError, match="inv_freq"):
        rope.apply_rope(q, k, torch.zeros(1, 3, dtype=torch.long), torch.ones(3))
    with pytest.raises(ValueError, match="positions must be integers"):
        rope.apply_rope(q, k, torch.zeros(1, 3), torch.ones(4))


# -- SAE decode -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_sae_decode_vs_reference(dtype, bias):
    g = gen(10)
    F, D, N, K = 97, 45, 13, 5
    w = torch.randn(F, D, generator=g).to(DEV, dtype)
    b = torch.randn(D, generator=g).to(DEV, dtype) if bias else None
    vals = torch.rand(N, K, generator=g).to(DEV)
    idx = torch.stack([torch.randperm(F, generator=g)[:K] for _ in range(N)]).to(DEV)
    out = sae_decode.sae_decode(idx, vals, w, b, impl="triton")
    codes = torch.zeros(N, F, dtype=torch.float64, device=DEV).scatter(1, idx, vals.double())
    bias64 = b.double() if bias else torch.zeros(D, dtype=torch.float64, device=DEV)
    exact = codes @ w.double() + bias64
    terms = codes.abs() @ w.double().abs() + bias64.abs()  # the fp32 accumulation rounds partial sums up to this
    # fp32 accumulation, one rounding at the store. Measured (seeds 1-4, 10): bf16 1.96u (the interpreter's
    # truncation), fp32 within 1.6 x 2^-24 x terms, against 4 allowed. A kernel accumulating in bf16 is off by
    # up to ~1000u on outputs with cancellation: caught here, let through by the old atol 0.2 / rtol 2e-2.
    _assert_one_rounding(out, exact, terms, 4, dtype)
    # torch's reference rounds the fp32 sum to nearest: within one ulp (2u) of the interpreter's truncation
    ref = sae_decode.sae_decode_reference(idx, vals, w, b).double()
    err = (out.double() - ref).abs()
    assert bool((err <= 2 * UNIT[dtype] * ref.abs() + 4 * 2.0**-24 * terms).all())


def test_sae_decode_bad_inputs():
    w = torch.randn(10, 4)
    with pytest.raises(ValueError, match="latent indices"):
        sae_decode.sae_decode(torch.tensor([[10]]), torch.ones(1, 1), w)
    with pytest.raises(ValueError, match="\\[N, k\\]"):
        sae_decode.sae_decode(torch.tensor([[1, 2]]), torch.ones(1, 3), w)


def test_auto_impl_on_cpu_without_interpreter(monkeypatch):
    from workbench.kernels._launch import resolve_impl

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve_impl("auto", torch.zeros(1)) == "torch"
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_impl("triton", torch.zeros(1))


def test_engine_with_fused_sampler():
    """The engine's kernel path: same greedy tokens; sampled tokens reproducible and inside the top-k set."""
    from workbench.engine import Engine, GenerationConfig, SamplingParams
    from workbench.models.tiny import build_tiny

    model, tok = build_tiny("llama")
    model = model.to(DEV)
    fused, plain = Engine(model, tok, sampler="triton"), Engine(model, tok, sampler="torch")
    greedy = GenerationConfig(max_new_tokens=5, ignore_eos=True)
    assert fused.generate(["hi"], greedy)[0].token_ids == plain.generate(["hi"], greedy)[0].token_ids
    cfg = GenerationConfig(max_new_tokens=4, ignore_eos=True, seed=3, sampling=SamplingParams(temperature=1.0, top_k=1))
    assert fused.generate(["hi"], cfg)[0].token_ids == plain.generate(["hi"], greedy)[0].token_ids[:4]
    hot = GenerationConfig(max_new_tokens=4, ignore_eos=True, seed=3, sampling=SamplingParams(top_p=0.9))
    assert fused.generate(["hi"], hot)[0].token_ids == fused.generate(["hi"], hot)[0].token_ids
    with pytest.raises(ValueError, match="cannot combine top-k with top-p"):
        fused.generate(["hi"], GenerationConfig(sampling=SamplingParams(top_k=3, top_p=0.5)))


def test_engine_fused_top_p_follows_the_nucleus():
    """The engine's kernel path with top-p: the first token's draws follow the model's nucleus distribution.
    A logit bias puts most of the mass on a few tokens, so that N_DRAWS rows (one per request, each with its
    own seed) cover every token of the nucleus; the token just outside it carries ~7%, so a leak shows."""
    import math

    from workbench.engine import Engine, GenerationConfig, SamplingParams
    from workbench.models.tiny import build_tiny

    model, tok = build_tiny("llama")
    model = model.to(DEV)
    bias = {ord("a") + i: 12 + math.log(w) for i, w in enumerate([0.3, 0.2, 0.15, 0.12, 0.09, 0.07, 0.05, 0.02])}
    params = SamplingParams(temperature=0.9, top_p=0.9, logit_bias=bias)
    cfgs = [GenerationConfig(max_new_tokens=1, ignore_eos=True, seed=s, sampling=params) for s in range(N_DRAWS)]
    res = Engine(model, tok, sampler="triton").generate(["hi"] * N_DRAWS, cfgs)
    with torch.no_grad():
        x = model(torch.tensor([res[0].prompt_ids], device=DEV)).logits[0, -1].float().cpu()
    for t, b in bias.items():
        x[t] += b
    probs = sampling.filtered_probs(x[None], 0.9, top_p=0.9)[0]
    assert 3 <= int((probs > 0).sum()) <= 8
    counts = torch.bincount(torch.tensor([r.token_ids[0] for r in res]), minlength=probs.numel())
    stats.check_draws(counts, probs, all_covered=True)
    stats.assert_detects_a_dropped_token(probs, N_DRAWS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, run the benchmark itself")
def test_benchmark_script_smoke(tmp_path):
    """The GPU benchmark builds, checks and times every kernel; --smoke runs it tiny in the interpreter."""
    import json
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "experiments" / "bench_kernels.py"), "--smoke", "--json",
                           str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["kernel"] for r in rows} == {"sampling top-p 0.9", "spec verify", "rope q+k", "sae top-k decode",
                                              "bgmv shrink+expand"}



def test_kernels_compile_for_hopper_without_a_gpu():
    # The interpreter is lax about types (it accepted a loop-carried variable changing from int1 to int32,
    # which the real compiler rejects), so every kernel is also compiled to a cubin for sm_90. A subprocess:
    # this module turned the interpreter on before Triton was imported, which makes Triton's own library
    # functions interpreted for the rest of the process.
    pytest.importorskip("triton")
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "workbench.kernels.aot_check", "--arch", "90"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(" ok") == len(list(aot_check.cases())), proc.stdout
