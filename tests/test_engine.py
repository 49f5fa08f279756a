"""The decode loop: exact greedy equality with HF generate, batching, stops, streaming, seeds."""

import pytest

from workbench.engine import Engine, GenerationConfig, SamplingParams
from workbench.models.tiny import build_tiny

PROMPTS = ["hello there", "a", "the quick brown fox jumps", "xyz 123 !"]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny(request):
    return build_tiny(request.param)


def hf_greedy(model, tok, prompts, n):
    """HF generate on a left-padded batch, EOS disabled: the reference for our greedy path."""
    ids = [tok(p)["input_ids"] for p in prompts]
    tok.padding_side = "left"
    enc = tok.pad({"input_ids": ids}, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id,
                         eos_token_id=None, min_new_tokens=n)
    return [row.tolist() for row in out[:, enc["input_ids"].shape[1]:]]


def test_greedy_equals_hf_batch1(tiny):
    model, tok = tiny
    eng = Engine(model, tok)
    for p in PROMPTS:
        [res] = eng.generate([p], GenerationConfig(max_new_tokens=24, ignore_eos=True))
        assert res.token_ids == hf_greedy(model, tok, [p], 24)[0]
        assert res.finish_reason == "length"


def test_greedy_equals_hf_batch4_ragged(tiny):
    model, tok = tiny
    res = Engine(model, tok).generate(PROMPTS, GenerationConfig(max_new_tokens=24, ignore_eos=True))
    assert [r.token_ids for r in res] == hf_greedy(model, tok, PROMPTS, 24)


def test_batching_does_not_change_rows(tiny):
    model, tok = tiny
    eng = Engine(model, tok)
    cfg = GenerationConfig(max_new_tokens=16, ignore_eos=True, sampling=SamplingParams(temperature=0.9), seed=7)
    alone = [eng.generate([p], cfg)[0].token_ids for p in PROMPTS]
    together = [r.token_ids for r in eng.generate(PROMPTS, cfg)]
    assert alone == together


def test_seeds(tiny):
    model, tok = tiny
    eng = Engine(model, tok)
    s = SamplingParams(temperature=1.0)
    a = eng.generate(["hi"], GenerationConfig(max_new_tokens=20, sampling=s, seed=1, ignore_eos=True))[0]
    b = eng.generate(["hi"], GenerationConfig(max_new_tokens=20, sampling=s, seed=1, ignore_eos=True))[0]
    c = eng.generate(["hi"], GenerationConfig(max_new_tokens=20, sampling=s, seed=2, ignore_eos=True))[0]
    assert a.token_ids == b.token_ids != c.token_ids


def test_per_request_limits_and_eos(tiny):
    model, tok = tiny
    eng = Engine(model, tok)
    [free] = eng.generate(["hello"], GenerationConfig(max_new_tokens=12, ignore_eos=True))
    stop_tok = free.token_ids[5]
    first = free.token_ids.index(stop_tok)
    cfgs = [GenerationConfig(max_new_tokens=3, ignore_eos=True),
            GenerationConfig(max_new_tokens=12, eos_token_ids=(stop_tok,))]
    short, eos = eng.generate(["hello", "hello"], cfgs)
    assert short.token_ids == free.token_ids[:3] and short.finish_reason == "length"
    assert eos.token_ids == free.token_ids[:first] and eos.finish_reason == "eos"


def test_stop_strings_and_streaming(tiny):
    model, tok = tiny
    eng = Engine(model, tok)
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
        Engine(*tiny).stream(prompts, cfg)


@pytest.mark.parametrize("kwargs,msg", [
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"stop_strings": "x"}, "tuple"), ({"stop_strings": ("",)}, "non-empty"),
])
def test_bad_configs(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        GenerationConfig(**kwargs)


@pytest.mark.realmodel
@pytest.mark.parametrize("batch", [1, 4])
def test_smollm2_greedy_equals_hf(smollm2, batch):
    from workbench.chat import prompt_ids

    model, tok = smollm2
    qs = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
          "Explain gravity to a child in two sentences."][:batch]
    ids = [prompt_ids(tok, [{"role": "user", "content": q}]) for q in qs]
    res = Engine(model, tok).generate(ids, GenerationConfig(max_new_tokens=24))
    tok.padding_side = "left"
    enc = tok.pad({"input_ids": ids}, return_tensors="pt")
    ref = model.generate(**enc, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
    for r, row in zip(res, ref[:, enc["input_ids"].shape[1]:].tolist(), strict=True):
        hf = row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
        assert r.token_ids == hf
    assert "Paris" in res[0].text and res[0].finish_reason == "eos"
