"""Beam search equals HF ``generate(num_beams=...)``: same hypotheses, same scores, EOS and length paths."""

import pytest
import torch

from workbench.engine import BeamConfig, Engine, GenerationConfig
from workbench.models.tiny import build_tiny

PROMPTS = ["hello there", "a", "the quick brown fox"]


@pytest.fixture(scope="module", params=[("llama", "packed-llama"), ("llama", "hf"), ("gpt2", "hf")],
                ids=lambda p: "-".join(p))
def tiny(request):
    arch, backend = request.param
    model, tok = build_tiny(arch)
    return model, tok, Engine(model, tok, backend=backend)


def hf_beam(model, tok, prompts, cfg: BeamConfig, eos):
    ids = [tok(p)["input_ids"] if isinstance(p, str) else p for p in prompts]
    tok.padding_side = "left"
    enc = tok.pad({"input_ids": ids}, return_tensors="pt")
    out = model.generate(**enc, num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                         length_penalty=cfg.length_penalty, early_stopping=cfg.early_stopping,
                         num_return_sequences=cfg.num_return_sequences, pad_token_id=tok.pad_token_id,
                         eos_token_id=list(eos), return_dict_in_generate=True, output_scores=True)
    return out.sequences[:, enc["input_ids"].shape[1]:].tolist(), out.sequences_scores.tolist()


def check_equal(results, ref, cfg, pad):
    seqs, scores = ref
    for b, res in enumerate(results):
        assert len(res.stats.hypotheses) == cfg.num_return_sequences
        for k, hyp in enumerate(res.stats.hypotheses):
            row, score = seqs[b * cfg.num_return_sequences + k], scores[b * cfg.num_return_sequences + k]
            ours = hyp.token_ids + ([row[len(hyp.token_ids)]] if hyp.finish_reason == "eos" else [])
            assert ours + [pad] * (len(row) - len(ours)) == row
            assert hyp.score == pytest.approx(score, abs=1e-4)
        assert [h.score for h in res.stats.hypotheses] == sorted((h.score for h in res.stats.hypotheses), reverse=True)


CONFIGS = [
    BeamConfig(num_beams=4, max_new_tokens=12),
    BeamConfig(num_beams=3, max_new_tokens=10, length_penalty=0.5, early_stopping=True, num_return_sequences=2),
    BeamConfig(num_beams=5, max_new_tokens=8, length_penalty=2.0, early_stopping="never"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=range(len(CONFIGS)))
def test_beam_equals_hf_length_limited(tiny, cfg):
    model, tok, eng = tiny
    eos = [tok.eos_token_id]
    check_equal(eng.generate(PROMPTS, cfg, strategy="beam"), hf_beam(model, tok, PROMPTS, cfg, eos), cfg,
                tok.pad_token_id)


@pytest.fixture(scope="module", params=[("llama", "packed-llama"), ("llama", "hf"), ("gpt2", "hf")],
                ids=lambda p: "-".join(p))
def eos_tiny(request):
    """A tiny model whose two EOS tokens get boosted logits, so hypotheses really end early (and some don't)."""
    arch, backend = request.param
    model, tok = build_tiny(arch)
    eos = (tok.eos_token_id, tok.convert_tokens_to_ids("<|endoftext|>"))
    with torch.no_grad():
        model.get_output_embeddings().weight[list(eos)] *= 3.0
    return model, tok, Engine(model, tok, backend=backend), eos


@pytest.mark.parametrize("cfg", CONFIGS, ids=range(len(CONFIGS)))
def test_beam_equals_hf_with_two_eos(eos_tiny, cfg):
    model, tok, eng, eos = eos_tiny
    cfg = BeamConfig(**{**cfg.__dict__, "eos_token_ids": eos})
    results = eng.generate(PROMPTS, cfg, strategy="beam")
    reasons = {h.finish_reason for r in results for h in r.stats.hypotheses}
    assert "eos" in reasons
    check_equal(results, hf_beam(model, tok, PROMPTS, cfg, eos), cfg, tok.pad_token_id)


def test_single_beam_is_greedy(tiny):
    _, _, eng = tiny
    greedy = eng.generate(PROMPTS, GenerationConfig(max_new_tokens=10, ignore_eos=True))
    beam = eng.generate(PROMPTS, BeamConfig(num_beams=1, max_new_tokens=10, eos_token_ids=()), strategy="beam")
    assert [b.token_ids for b in beam] == [g.token_ids for g in greedy]


@pytest.mark.parametrize("kwargs,msg", [
    ({"num_beams": 0}, "num_beams"), ({"num_return_sequences": 5, "num_beams": 4}, "num_return_sequences"),
    ({"early_stopping": "sometimes"}, "early_stopping"), ({"max_new_tokens": 0}, "max_new_tokens"),
])
def test_bad_beam_configs(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        BeamConfig(**kwargs)


def test_beam_needs_beam_config(tiny):
    with pytest.raises(TypeError, match="BeamConfig"):
        tiny[2].generate(PROMPTS, GenerationConfig(), strategy="beam")


@pytest.mark.realmodel
def test_smollm2_beam_equals_hf(smollm2):
    from workbench.chat import prompt_ids

    model, tok = smollm2
    ids = [prompt_ids(tok, [{"role": "user", "content": "Name a large city in Europe."}])]
    cfg = BeamConfig(num_beams=3, max_new_tokens=12, num_return_sequences=2)
    results = Engine(model, tok).generate(ids, cfg, strategy="beam")
    check_equal(results, hf_beam(model, tok, ids, cfg, [tok.eos_token_id]), cfg, tok.pad_token_id)
