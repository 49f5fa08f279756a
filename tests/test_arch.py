"""One architecture table: the packed backend runs every Llama-layout family it lists (equal to HF), refuses
the others with the reason, and hooks / RoPE scaling read the same table."""

import pytest
import torch

from workbench.arch import ARCHITECTURES, arch_of, get_module
from workbench.context import RopeScaling, apply_rope_scaling
from workbench.engine import Engine, GenerationConfig
from workbench.engine.backends import PackedLlamaBackend
from workbench.interp import Hooks
from workbench.models.tiny import build_tiny, byte_tokenizer

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.1, tie_word_embeddings=False)


def tiny(model_type, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = byte_tokenizer()
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id, **{**SMALL, **extra})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    if model_type == "qwen2":  # biases are zero-initialised: make them matter
        with torch.no_grad():
            for blk in model.model.layers:
                for proj in (blk.self_attn.q_proj, blk.self_attn.k_proj, blk.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    if model_type == "qwen3":  # q/k norm weights start at one: make them matter
        with torch.no_grad():
            for blk in model.model.layers:
                blk.self_attn.q_norm.weight.uniform_(0.5, 1.5)
                blk.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    return model, tok


FAMILIES = {"llama": {}, "mistral": {"sliding_window": None}, "qwen2": {}, "qwen3": {"head_dim": 16}}


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("native", [None, False])
def test_packed_equals_hf_for_every_llama_layout_family(model_type, native):
    model, tok = tiny(model_type, **FAMILIES[model_type])
    assert PackedLlamaBackend.unsupported(model) is None
    packed = Engine(model, tok, backend=PackedLlamaBackend(model, native=native))
    hf = Engine(model, tok, backend="hf")
    prompts = [tok("hello there")["input_ids"], tok("a b")["input_ids"]]
    torch.testing.assert_close(packed.start(prompts, 0).logits, hf.start(prompts, 0).logits, atol=2e-5, rtol=2e-5)
    with torch.no_grad():
        ref = model(torch.tensor([prompts[0]])).logits[0, -1]
    torch.testing.assert_close(packed.start(prompts[:1], 0).logits[0], ref, atol=2e-5, rtol=2e-5)
    cfg = GenerationConfig(max_new_tokens=10, ignore_eos=True)
    assert [r.token_ids for r in packed.generate(prompts, cfg)] == [r.token_ids for r in hf.generate(prompts, cfg)]
    # hooks run in the packed loop there too
    hooks = [("blocks.1.mlp.hook_post", lambda act, hook: act * 2.0)]
    with packed.intervene(hooks=hooks):
        a = packed.start(prompts[:1], 0).logits
    with Hooks(model, hooks), torch.no_grad():
        b = model(torch.tensor([prompts[0]])).logits[:, -1]
    torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


def test_mistral_sliding_window_limits_the_packed_backend():
    model, tok = tiny("mistral", sliding_window=24)
    b = PackedLlamaBackend(model)
    assert b.max_cache_len() == 24
    with pytest.raises(ValueError, match="sliding window of 24"):
        b.new_cache(1, 40)
    eng = Engine(model, tok)  # auto: the model's own forward once the window matters
    eng.generate(["hi"], GenerationConfig(max_new_tokens=4))
    assert eng.backend.name == "packed-llama"
    eng.generate(["hi"], GenerationConfig(max_new_tokens=40, ignore_eos=True))
    assert eng.backend.name == "hf"


def test_qwen2_sliding_layers_are_refused_with_the_reason():
    model, _ = tiny("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1)
    if all(t == "full_attention" for t in model.config.layer_types):
        pytest.skip("this transformers version builds no sliding layers from these settings")
    assert "sliding-window" in PackedLlamaBackend.unsupported(model)


@pytest.mark.parametrize("arch, reason", [("gpt2", "Conv1D"), ])
def test_other_families_are_refused_with_the_reason(arch, reason):
    model, _ = build_tiny(arch)
    assert reason in PackedLlamaBackend.unsupported(model)
    with pytest.raises(ValueError, match=reason):
        PackedLlamaBackend(model)


def test_gemma_is_refused_with_the_reason():
    assert "sandwich norms" in ARCHITECTURES["gemma3_text"].packed_refusal
    assert ARCHITECTURES["gemma3_text"].packed is None


def test_gpt2_weight_layout_is_in_out():
    model, _ = build_tiny("gpt2")
    spec = arch_of(model)
    assert spec.weight_layout == "in_out"
    c_proj = get_module(get_module(model, spec.layers)[0], spec.mlp_down)
    d, hidden = model.config.n_embd, 4 * model.config.n_embd
    assert tuple(c_proj.weight.shape) == (hidden, d)  # [in, out], unlike nn.Linear
    llama, _ = build_tiny("llama")
    assert arch_of(llama).weight_layout == "out_in"


def test_every_entry_resolves_on_a_model_of_its_family():
    """Each path in the table exists on a tiny model of every family we can build here."""
    builders = {"llama": lambda: build_tiny("llama")[0], "gpt2": lambda: build_tiny("gpt2")[0],
                **{t: (lambda t=t: tiny(t, **FAMILIES[t])[0]) for t in ("mistral", "qwen2", "qwen3")}}
    for mtype, build in builders.items():
        model, spec = build(), ARCHITECTURES[mtype]
        for path in (spec.layers, spec.embed, spec.final_norm, spec.unembed, spec.pos_embed, spec.rotary):
            if path:
                get_module(model, path)
        block = get_module(model, spec.layers)[0]
        for path in (spec.attn, spec.attn_out, spec.mlp_out, spec.mlp_down, spec.o_proj):
            get_module(block, path)
        if spec.packed:
            lay = spec.packed
            for path in (lay.input_norm, lay.q, lay.k, lay.v, lay.o, lay.post_norm, lay.gate, lay.up, lay.down,
                         lay.q_norm, lay.k_norm):
                if path:
                    get_module(block, path)


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3"])
def test_rope_scaling_reads_the_rotary_path_from_the_table(model_type):
    model, _ = tiny(model_type, **FAMILIES[model_type])
    rope = get_module(model, ARCHITECTURES[model_type].rotary)
    before = rope.inv_freq.clone()
    with apply_rope_scaling(model, RopeScaling("linear", 2.0)):
        torch.testing.assert_close(rope.inv_freq, before / 2)
    torch.testing.assert_close(rope.inv_freq, before)
