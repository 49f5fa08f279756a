"""The decode loop: exact greedy equality with HF generate, batching, stops, streaming, seeds."""

import pytest
import torch

from workbench.engine import Engine, GenerationConfig, SamplingParams
from workbench.models.tiny import build_tiny

PROMPTS = ["hello there", "a", "the quick brown fox jumps", "xyz 123 !"]


@pytest.fixture(scope="module", params=[("llama", "packed-llama"), ("llama", "hf"), ("gpt2", "hf")],
                ids=lambda p: "-".join(p))
def tiny(request):
    arch, backend = request.param
    return (*build_tiny(arch), backend)


def hf_greedy(model, tok, prompts, n):
    """HF generate on a left-padded batch, EOS disabled: the reference for our greedy path."""
    ids = [tok(p)["input_ids"] for p in prompts]
    tok.padding_side = "left"
    enc = tok.pad({"input_ids": ids}, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id,
                         eos_token_id=None, min_new_tokens=n)
    return [row.tolist() for row in out[:, enc["input_ids"].shape[1]:]]


def test_greedy_equals_hf_batch1(tiny):
    model, tok, backend = tiny
    eng = Engine(model, tok, backend=backend)
    for p in PROMPTS:
        [res] = eng.generate([p], GenerationConfig(max_new_tokens=24, ignore_eos=True))
        assert res.token_ids == hf_greedy(model, tok, [p], 24)[0]
        assert res.finish_reason == "length"


def test_greedy_equals_hf_batch4_ragged(tiny):
    model, tok, backend = tiny
    res = Engine(model, tok, backend=backend).generate(PROMPTS, GenerationConfig(max_new_tokens=24, ignore_eos=True))
    assert [r.token_ids for r in res] == hf_greedy(model, tok, PROMPTS, 24)


def test_batching_does_not_change_rows(tiny):
    model, tok, backend = tiny
    eng = Engine(model, tok, backend=backend)
    cfg = GenerationConfig(max_new_tokens=16, ignore_eos=True, sampling=SamplingParams(temperature=0.9), seed=7)
    alone = [eng.generate([p], cfg)[0].token_ids for p in PROMPTS]
    together = [r.token_ids for r in eng.generate(PROMPTS, cfg)]
    assert alone == together


def test_seeds(tiny):
    model, tok, backend = tiny
    eng = Engine(model, tok, backend=backend)
    s = SamplingParams(temperature=1.0)
    a = eng.generate(["hi"], GenerationConfig(max_new_tokens=20, sampling=s, seed=1, ignore_eos=True))[0]
    b = eng.generate(["hi"], GenerationConfig(max_new_tokens=20, sampling=s, seed=1, ignore_eos=True))[0]
    c = eng.generate(["hi"], GenerationConfig(max_new_tokens=20, sampling=s, seed=2, ignore_eos=True))[0]
    assert a.token_ids == b.token_ids != c.token_ids


def test_per_request_limits_and_eos(tiny):
    model, tok, backend = tiny
    eng = Engine(model, tok, backend=backend)
    [free] = eng.generate(["hello"], GenerationConfig(max_new_tokens=12, ignore_eos=True))
    stop_tok = free.token_ids[5]
    first = free.token_ids.index(stop_tok)
    cfgs = [GenerationConfig(max_new_tokens=3, ignore_eos=True),
            GenerationConfig(max_new_tokens=12, eos_token_ids=(stop_tok,))]
    short, eos = eng.generate(["hello", "hello"], cfgs)
    assert short.token_ids == free.token_ids[:3] and short.finish_reason == "length"
    assert eos.token_ids == free.token_ids[:first] and eos.finish_reason == "eos"


def test_stop_strings_and_streaming(tiny):
    model, tok, backend = tiny
    eng = Engine(model, tok, backend=backend)
    [free] = eng.generate(["stream me"], GenerationConfig(max_new_tokens=20, ignore_eos=True))
    text = free.text
    assert len(text) > 6
    stop = text[4:6]
    cfg = GenerationConfig(max_new_tokens=20, ignore_eos=True, stop_strings=(stop,))
    events = list(eng.stream(["stream me"], cfg))
    [res] = eng.generate(["stream me"], cfg)
    assert res.finish_reason == "stop" and res.text == text[: text.find(stop)]
    assert "".join(e.text for e in events) == res.text  # streamed deltas add up, stop string withheld
    assert events[-1].finished and not any(e.finished for e in events[:-1])
    full = list(eng.stream(["stream me"], GenerationConfig(max_new_tokens=20, ignore_eos=True)))
    assert "".join(e.text for e in full) == text and [e.token_id for e in full] == free.token_ids


@pytest.mark.parametrize("prompts,cfg,msg", [
    ([""], GenerationConfig(), "empty prompt"),
    ([[]], GenerationConfig(), "empty prompt"),
    ("just a string", GenerationConfig(), "non-empty list"),
    ([[1, 10**6]], GenerationConfig(), "out of range"),
    (["a", "b"], [GenerationConfig()], "2 prompts"),
])
def test_bad_requests(tiny, prompts, cfg, msg):
    with pytest.raises(ValueError, match=msg):
        Engine(tiny[0], tiny[1], backend=tiny[2]).stream(prompts, cfg)


@pytest.mark.parametrize("kwargs,msg", [
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"stop_strings": "x"}, "tuple"), ({"stop_strings": ("",)}, "non-empty"),
])
def test_bad_configs(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        GenerationConfig(**kwargs)


@pytest.mark.realmodel
@pytest.mark.parametrize("backend", ["packed-llama", "hf"])
@pytest.mark.parametrize("batch", [1, 4])
def test_smollm2_greedy_equals_hf(smollm2, batch, backend):
    from workbench.chat import prompt_ids

    model, tok = smollm2
    qs = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
          "Explain gravity to a child in two sentences."][:batch]
    ids = [prompt_ids(tok, [{"role": "user", "content": q}]) for q in qs]
    res = Engine(model, tok, backend=backend).generate(ids, GenerationConfig(max_new_tokens=24))
    tok.padding_side = "left"
    enc = tok.pad({"input_ids": ids}, return_tensors="pt")
    ref = model.generate(**enc, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
    for r, row in zip(res, ref[:, enc["input_ids"].shape[1]:].tolist(), strict=True):
        hf = row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
        assert r.token_ids == hf
    assert "Paris" in res[0].text and res[0].finish_reason == "eos"


def test_repetition_penalty_end_to_end_equals_hf(tiny):
    model, tok, backend = tiny
    cfg = GenerationConfig(max_new_tokens=20, ignore_eos=True, sampling=SamplingParams(temperature=0.0,
                                                                                        repetition_penalty=1.6))
    res = Engine(model, tok, backend=backend).generate(PROMPTS, cfg)
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    tok.padding_side = "left"
    enc = tok.pad({"input_ids": ids}, return_tensors="pt")
    ref = model.generate(**enc, max_new_tokens=20, min_new_tokens=20, do_sample=False, repetition_penalty=1.6,
                         pad_token_id=tok.pad_token_id, eos_token_id=None)
    assert [r.token_ids for r in res] == ref[:, enc["input_ids"].shape[1]:].tolist()
    plain = Engine(model, tok, backend=backend).generate(PROMPTS, GenerationConfig(max_new_tokens=20, ignore_eos=True))
    assert [r.token_ids for r in res] != [r.token_ids for r in plain]  # the penalty really acted


def test_frequency_penalty_and_bias_end_to_end(tiny):
    model, tok, backend = tiny
    eng = Engine(model, tok, backend=backend)
    forced = eng.generate(["hi"], GenerationConfig(max_new_tokens=6, ignore_eos=True, sampling=SamplingParams(
        temperature=0.0, logit_bias={65: 100.0})))[0]
    assert forced.token_ids == [65] * 6
    # the frequency penalty (2 per use) wears a +5 bias down: chosen first, then pushed below the others
    mixed = eng.generate(["hi"], GenerationConfig(max_new_tokens=6, ignore_eos=True, sampling=SamplingParams(
        temperature=0.0, logit_bias={65: 5.0}, frequency_penalty=2.0)))[0]
    assert mixed.token_ids[0] == 65 and 1 <= mixed.token_ids.count(65) <= 3


def test_unknown_strategy_and_backend(tiny):
    from workbench.errors import UnknownNameError

    model, tok, backend = tiny
    with pytest.raises(UnknownNameError, match="unknown generation strategy 'beams'.*Did you mean 'beam'"):
        Engine(model, tok, backend=backend).generate(["hi"], None, strategy="beams")
    with pytest.raises(UnknownNameError, match="unknown engine backend 'HF'"):
        Engine(model, tok, backend="HF")


def test_register_strategy():
    from workbench.engine import STRATEGIES, register_strategy

    class Echo:
        config_type = GenerationConfig

        def generate(self, engine, prompts, config):
            return [engine.encode(p) for p in prompts]

    register_strategy("echo-test", Echo())
    try:
        model, tok = build_tiny("llama")
        assert Engine(model, tok).generate(["ab"], strategy="echo-test") == [tok("ab")["input_ids"]]
        with pytest.raises(ValueError, match="already registered"):
            register_strategy("echo-test", Echo())
    finally:
        STRATEGIES.pop("echo-test")


def test_packed_backend_follows_weight_edits():
    """The packed copy must never serve stale weights after an in-place edit of the model."""
    import torch

    model, tok = build_tiny("llama")
    eng = Engine(model, tok, backend="packed-llama")
    cfg = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    before = eng.generate(["hello"], cfg)[0].token_ids
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(-3.0)
    after = eng.generate(["hello"], cfg)[0].token_ids
    assert after == Engine(model, tok, backend="hf").generate(["hello"], cfg)[0].token_ids
    assert after != before


def test_packed_backend_rejects_other_architectures():
    model, tok = build_tiny("gpt2")
    with pytest.raises(ValueError, match="packed-llama.*model_type 'gpt2'"):
        Engine(model, tok, backend="packed-llama")
    assert Engine(model, tok).backend.name == "hf"  # auto falls back


def test_hf_backend_passes_the_cache_under_the_forwards_own_name():
    # transformers 5.x renamed past_key_values to cache; a forward that swallows **kwargs would silently
    # ignore the wrong name (each decode step then sees only its new token).
    from workbench.engine.backends import cache_kwarg

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, **kwargs):
            return kwargs

    class New(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, **kwargs):
            return kwargs

    assert cache_kwarg(Old()) == "past_key_values"
    assert cache_kwarg(New()) == "cache"
    with pytest.raises(TypeError, match="neither"):
        cache_kwarg(torch.nn.Linear(2, 2))
    model, _ = build_tiny("llama")
    assert cache_kwarg(model) in ("cache", "past_key_values")


def test_packed_backend_only_for_cpu_weights():
    # A GPU model must get the HF backend under "auto" (the C++ backend reads host memory); the meta device
    # stands in for CUDA on a machine without one.
    from workbench.engine.backends import PackedLlamaBackend

    model, _ = build_tiny("llama")
    assert PackedLlamaBackend.unsupported(model) is None
    assert "runs on CPU" in PackedLlamaBackend.unsupported(model.to("meta"))


def test_chunked_prefill_is_exact(tiny):
    model, tok, backend = tiny
    cfg = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    whole = Engine(model, tok, backend=backend).generate(["a long prompt to cut in pieces"], cfg)[0].token_ids
    chunked = Engine(model, tok, backend=backend, prefill_chunk=7).generate(["a long prompt to cut in pieces"], cfg)
    assert chunked[0].token_ids == whole
