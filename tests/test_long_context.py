"""Long-context evaluation harness: exact NLL slicing, streaming NLL, passkey prompts, experiment report."""

import json
import random
import sys

import pytest
import torch
import torch.nn.functional as F

from workbench.context import SinkConfig, StreamingLM
from workbench.eval import long_context as lc
from workbench.models.tiny import build_tiny


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("llama")


def full_nll(model, ids):
    with torch.no_grad():
        logits = model(ids[None]).logits[0, :-1]
    return F.cross_entropy(logits, ids[1:], reduction="none")


def test_nll_by_position_matches_full_logits(tiny):
    model, _ = tiny
    ids = torch.randint(0, 256, (75,), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(lc.nll_by_position(model, ids, slice_len=16), full_nll(model, ids), atol=1e-5,
                               rtol=1e-5)


def test_length_ppl_buckets(tiny):
    model, _ = tiny
    windows = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(1))
    res = lc.length_ppl(model, windows, bucket=10, progress=False)
    nll = torch.stack([full_nll(model, w) for w in windows])
    assert res.n_windows == 2 and len(res.bucket_nll) == 4
    assert res.bucket_nll[1] == pytest.approx(float(nll[:, 10:20].mean()), abs=1e-5)
    assert res.ppl == pytest.approx(float(nll.mean().exp()), rel=1e-5)


def test_streaming_nll_equals_full_before_eviction(tiny):
    model, _ = tiny
    ids = torch.randint(0, 256, (50,), generator=torch.Generator().manual_seed(2))
    stream = StreamingLM(model, SinkConfig(n_sink=2, window=100, chunk=8))
    torch.testing.assert_close(lc.streaming_nll(stream, ids), full_nll(model, ids), atol=1e-5, rtol=1e-5)
    small = StreamingLM(model, SinkConfig(n_sink=2, window=10, chunk=8))
    assert lc.streaming_nll(small, ids).shape == (49,) and small.max_length == 12


def test_passkey_prompt(tiny):
    _, tok = tiny
    ids = lc.passkey_prompt(tok, 600, 0.5, "12345")
    text = tok.decode(ids)
    assert len(ids) == 600 and text.count("12345") == 2 and text.endswith(lc.QUESTION)
    at = text.index("12345") / len(text)
    assert 0.4 < at < 0.6
    assert tok.decode(lc.passkey_prompt(tok, 600, 0.0, "99999")).index("99999") < 250
    with pytest.raises(ValueError, match="too short"):
        lc.passkey_prompt(tok, 50, 0.5, "12345")
    with pytest.raises(ValueError, match="depth"):
        lc.passkey_prompt(tok, 600, 1.5, "12345")


def test_passkey_trial_scores_the_answer(tiny, monkeypatch):
    from workbench.engine import Engine, GenerationResult

    model, tok = tiny
    engine = Engine(model, tok)
    rng = random.Random(0)
    key = str(random.Random(0).randint(10000, 99999))
    monkeypatch.setattr(engine, "generate", lambda p, c: [GenerationResult(p[0], [], f" {key}. Remember")])
    assert lc.passkey_trial(engine, 400, 0.3, rng).correct
    monkeypatch.setattr(engine, "generate", lambda p, c: [GenerationResult(p[0], [], " 11111 or so")])
    assert not lc.passkey_trial(engine, 400, 0.3, rng).correct


def test_experiment_report_writes_plots(tmp_path):
    from conftest import REPO

    sys.path.insert(0, str(REPO / "experiments"))
    try:
        import context_extension as ce
    finally:
        sys.path.pop(0)
    data = {"model": "x", "native": 8192, "sinks": [
        {"n_sink": 4, "capacity": 2048, "tokens": 4096, "ppl": 10.0, "bucket": 1024, "bucket_nll": [2.0, 2.1, 2.2]}],
        "passkey": [{"method": "yarn", "x": 2, "correct": True}, {"method": "none", "x": 2, "correct": False}],
        "ppl": [{"method": "none", "x": 1, "ppl": 9.0, "bucket": 1024, "bucket_nll": [2.5, 2.2]}]}
    (tmp_path / "r.json").write_text(json.dumps(data))
    ce.report(ce.load(tmp_path / "r.json"), tmp_path / "plots")
    assert (tmp_path / "plots" / "passkey.png").stat().st_size > 1000
    assert (tmp_path / "plots" / "ppl_by_position.png").stat().st_size > 1000


def test_mha_attention_is_exact_and_restored(tiny_llama):
    # The repeat-K/V attention (used for float32 long windows on CUDA) must give HF's sdpa result; checked here
    # on CPU, on a GQA model (4 query / 2 KV heads); the model's attention setting comes back afterwards.
    from workbench.eval.attention import NAME, mha_attention
    from workbench.eval.long_context import nll_by_position

    model, _ = tiny_llama
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    ids = torch.randint(0, model.config.vocab_size, (70,), generator=torch.Generator().manual_seed(1))
    ref = nll_by_position(model, ids)
    with mha_attention(model):
        assert model.config._attn_implementation == NAME
        got = nll_by_position(model, ids)
        with torch.no_grad():
            ref_batch = model(ids[None, :40]).logits
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(ref_batch, model(ids[None, :40]).logits, rtol=1e-5, atol=1e-5)


def test_mha_attention_refuses_cached_keys_without_mask(tiny_llama):
    from workbench.eval.attention import sdpa_mha

    model, _ = tiny_llama
    attn = model.model.layers[0].self_attn
    q, kv = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="as many keys as queries"):
        sdpa_mha(attn, q, kv, kv, None)


def test_mha_attention_only_for_plain_gqa_models(tiny_llama):
    from transformers import Gemma3TextConfig, GPT2Config

    from workbench.eval.attention import needs_mha, plain_gqa

    model, _ = tiny_llama
    assert plain_gqa(model.config)
    assert not plain_gqa(Gemma3TextConfig(num_attention_heads=4, num_key_value_heads=1))  # sliding layers
    assert not plain_gqa(GPT2Config())  # no grouped K/V: sdpa already has a fused float32 kernel
    assert not needs_mha(model)  # CPU weights
