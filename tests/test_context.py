"""Context extension: RoPE scaling equals transformers' own rope functions; apply/remove is exact; sinks."""

import pytest
import torch

from workbench.context import RopeScaling, SinkConfig, StreamingLM, apply_rope_scaling, inv_freq_for
from workbench.models.tiny import build_tiny


def hf_rope(rope_type, base=10000.0, head_dim=64, max_pos=2048, seq_len=None, **params):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=max_pos,
                      rope_parameters={"rope_type": rope_type, "rope_theta": base, **params})
    return ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu", seq_len=seq_len)


CASES = [
    # (ours, transformers rope_type, transformers params, seq_len)
    (RopeScaling("linear", 1.0), "linear", {"factor": 1.0}, None),
    (RopeScaling("linear", 4.0), "linear", {"factor": 4.0}, None),
    (RopeScaling("dynamic-ntk", 2.0), "dynamic", {"factor": 2.0}, 1000),  # below the original: unchanged
    (RopeScaling("dynamic-ntk", 2.0), "dynamic", {"factor": 2.0}, 5000),
    (RopeScaling("dynamic-ntk", 1.0), "dynamic", {"factor": 1.0}, 9000),
    (RopeScaling("yarn", 4.0, original_max_position_embeddings=512), "yarn",
     {"factor": 4.0, "original_max_position_embeddings": 512}, None),
    (RopeScaling("yarn", 1.0, original_max_position_embeddings=2048), "yarn",
     {"factor": 1.0, "original_max_position_embeddings": 2048}, None),
    (RopeScaling("yarn", 8.0, original_max_position_embeddings=1024, truncate=False, beta_fast=16, beta_slow=2),
     "yarn", {"factor": 8.0, "original_max_position_embeddings": 1024, "truncate": False, "beta_fast": 16,
              "beta_slow": 2}, None),
    (RopeScaling("yarn", 4.0, original_max_position_embeddings=512, mscale=0.707, mscale_all_dim=1.0), "yarn",
     {"factor": 4.0, "original_max_position_embeddings": 512, "mscale": 0.707, "mscale_all_dim": 1.0}, None),
    (RopeScaling("yarn", 4.0, original_max_position_embeddings=512, attention_factor=1.5), "yarn",
     {"factor": 4.0, "original_max_position_embeddings": 512, "attention_factor": 1.5}, None),
    (RopeScaling("llama3", 8.0, original_max_position_embeddings=512), "llama3",
     {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 512}, None),
    (RopeScaling("llama3", 1.0, original_max_position_embeddings=2048, low_freq_factor=2.0, high_freq_factor=8.0),
     "llama3", {"factor": 1.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
                "original_max_position_embeddings": 2048}, None),
]


@pytest.mark.parametrize("ours,hf_type,hf_params,seq_len", CASES, ids=range(len(CASES)))
@pytest.mark.parametrize("base,head_dim", [(10000.0, 64), (100000.0, 64), (500000.0, 128)])
def test_inv_freq_and_attention_factor_equal_transformers(ours, hf_type, hf_params, seq_len, base, head_dim):
    ref_inv, ref_attn = hf_rope(hf_type, base=base, head_dim=head_dim, seq_len=seq_len, **hf_params)
    original = ours.original_max_position_embeddings or 2048
    inv, attn = inv_freq_for(ours, base, head_dim, original, seq_len=seq_len)
    torch.testing.assert_close(inv, ref_inv, atol=1e-6, rtol=1e-6)
    assert attn == pytest.approx(float(ref_attn), abs=1e-6)


def test_static_ntk_is_dynamic_ntk_at_factor_times_context():
    """NTK-aware scaling by a equals HF's dynamic NTK (factor 1) evaluated at a times the original context."""
    ref_inv, _ = hf_rope("dynamic", head_dim=64, max_pos=2048, seq_len=4 * 2048, factor=1.0)
    inv, attn = inv_freq_for(RopeScaling("ntk", 4.0), 10000.0, 64, 2048)
    torch.testing.assert_close(inv, ref_inv, atol=1e-6, rtol=1e-6)
    assert attn == 1.0


@pytest.fixture()
def tiny():
    return build_tiny("llama")


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_scale_one_is_exact_and_remove_restores(tiny):
    model, _ = tiny
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    ref = logits(model, ids)
    for s in [RopeScaling("linear", 1.0), RopeScaling("ntk", 1.0), RopeScaling("none")]:
        with apply_rope_scaling(model, s):
            assert torch.equal(logits(model, ids), ref)
    for s in [RopeScaling("linear", 4.0), RopeScaling("yarn", 4.0, original_max_position_embeddings=64),
              RopeScaling("dynamic-ntk", 4.0, original_max_position_embeddings=16)]:
        handle = apply_rope_scaling(model, s)
        assert not torch.allclose(logits(model, ids), ref)
        handle.remove()
        handle.remove()  # idempotent
        assert torch.equal(logits(model, ids), ref)
    assert not hasattr(model.model.rotary_emb, "_daert_rope_scaling")
    assert not model.model.rotary_emb._forward_pre_hooks


def test_dynamic_hook_equals_transformers_dynamic_model():
    from transformers import LlamaForCausalLM

    model, _ = build_tiny("llama")
    cfg = model.config.to_dict()
    cfg["rope_parameters"] = {"rope_type": "dynamic", "factor": 3.0, "rope_theta": 10000.0}
    cfg["max_position_embeddings"] = 32
    hf_dyn = LlamaForCausalLM(type(model.config).from_dict(cfg)).eval()
    hf_dyn.load_state_dict(model.state_dict())
    ids = torch.randint(0, 256, (1, 90), generator=torch.Generator().manual_seed(1))
    with apply_rope_scaling(model, RopeScaling("dynamic-ntk", 3.0, original_max_position_embeddings=32)):
        ours = logits(model, ids)
    torch.testing.assert_close(ours, logits(hf_dyn, ids), atol=1e-5, rtol=1e-5)


def test_yarn_model_equals_transformers_yarn_model():
    from transformers import LlamaForCausalLM

    model, _ = build_tiny("llama")
    params = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 64}
    cfg = model.config.to_dict()
    cfg["rope_parameters"] = params
    hf_yarn = LlamaForCausalLM(type(model.config).from_dict(cfg)).eval()
    hf_yarn.load_state_dict(model.state_dict())
    ids = torch.randint(0, 256, (1, 100), generator=torch.Generator().manual_seed(2))
    with apply_rope_scaling(model, RopeScaling("yarn", 4.0, original_max_position_embeddings=64)):
        torch.testing.assert_close(logits(model, ids), logits(hf_yarn, ids), atol=1e-5, rtol=1e-5)


def test_engine_backends_follow_scaling(tiny):
    """The packed backend picks up static scaling (re-pack) and hands dynamic scaling to the HF backend."""
    from workbench.engine import Engine, GenerationConfig

    model, tok = tiny
    cfg = GenerationConfig(max_new_tokens=10, ignore_eos=True)
    eng, ref = Engine(model, tok), Engine(model, tok, backend="hf")
    for s in [RopeScaling("linear", 3.0), RopeScaling("dynamic-ntk", 2.0, original_max_position_embeddings=8)]:
        with apply_rope_scaling(model, s):
            assert eng.generate(["scaled rope"], cfg)[0].token_ids == ref.generate(["scaled rope"], cfg)[0].token_ids
            assert eng.backend.name == ("hf" if s.method == "dynamic-ntk" else "packed-llama")
    assert eng.generate(["x"], cfg) and eng.backend.name == "packed-llama"


def test_bad_scaling_inputs(tiny):
    from workbench.errors import UnknownNameError

    model, _ = tiny
    with pytest.raises(UnknownNameError, match="did you mean 'yarn'|Did you mean 'yarn'"):
        RopeScaling("YaRN", 2.0)
    with pytest.raises(ValueError, match="factor must be >= 1"):
        RopeScaling("linear", 0.5)
    with apply_rope_scaling(model, RopeScaling("linear", 2.0)), pytest.raises(RuntimeError, match="already"):
        apply_rope_scaling(model, RopeScaling("linear", 2.0))
    gpt2, _ = build_tiny("gpt2")
    with pytest.raises(ValueError, match="supports model types"):
        apply_rope_scaling(gpt2, RopeScaling("linear", 2.0))


# -- attention sinks -----------------------------------------------------------------------------------------

def test_sinks_equal_model_before_eviction(tiny):
    model, _ = tiny
    ids = torch.randint(0, 256, (70,), generator=torch.Generator().manual_seed(3))
    stream = StreamingLM(model, SinkConfig(n_sink=4, window=100, chunk=16))
    torch.testing.assert_close(stream.feed(ids), logits(model, ids[None])[0], atol=1e-5, rtol=1e-5)


def test_sinks_cache_is_bounded_and_generation_goes_on(tiny):
    model, tok = tiny
    cfg = SinkConfig(n_sink=4, window=28, chunk=8)
    stream = StreamingLM(model, cfg)
    out = stream.generate(tok("a prompt")["input_ids"], max_new_tokens=150)
    assert len(out) == 150 and stream.seen > 4 * cfg.capacity
    assert stream.max_length == cfg.capacity  # filled, never more after eviction
    assert stream.k.shape[2] == cfg.capacity + cfg.chunk  # the buffer itself is the hard bound
    # the sinks are the first tokens ever fed, still in place
    fresh = StreamingLM(model, cfg)
    fresh.feed(tok("a prompt")["input_ids"])
    assert torch.equal(stream.k[:, :, :4], fresh.k[:, :, :4])


def test_sinks_need_llama(tiny):
    gpt2, _ = build_tiny("gpt2")
    with pytest.raises(ValueError, match="packed-llama"):
        StreamingLM(gpt2)
    with pytest.raises(ValueError, match="window >= 1"):
        SinkConfig(window=0)
