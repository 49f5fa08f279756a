"""Interventions through the engine's one seam: every hook kind, replacing and reading, on every backend, equal
to the model's own forward with the same hook installed; residual offsets per row; refusals."""

import pytest
import torch

from workbench.engine import Engine, GenerationConfig, Interventions
from workbench.engine.backends import PackedLlamaBackend
from workbench.interp import Hooks
from workbench.models.tiny import build_tiny

KINDS = ("hook_resid_pre", "attn.hook_z", "hook_attn_out", "hook_resid_mid", "mlp.hook_post", "hook_mlp_out",
         "hook_resid_post")
GLOBAL = ("hook_embed", "ln_final.hook_normalized")
BACKENDS = ("hf", "packed-native", "packed-python")
PROMPTS = ["hello there", "a"]


def engine_for(model, tok, backend):
    if backend == "hf":
        return Engine(model, tok, backend="hf")
    native = backend == "packed-native"
    b = PackedLlamaBackend(model, native=None if native else False)
    if native and b.native is None:
        pytest.skip("the native helper did not build")
    return Engine(model, tok, backend=b)


def replacing(seed):
    """A shape-agnostic replacement: scale the last dimension by fixed per-channel factors."""
    def fn(act, hook):
        g = torch.Generator().manual_seed(seed)
        scale = 1 + 0.5 * torch.rand(act.shape[-1], generator=g)
        return act * scale.to(act.dtype)
    return fn


def reading(store):
    def fn(act, hook):
        store.append(act.detach().clone())
    return fn


def hf_greedy(model, tok, prompt, n, hooks=()):
    """Reference: the model's own full forward (no cache) with ``hooks`` installed, greedy."""
    ids = tok(prompt)["input_ids"]
    first = None
    with Hooks(model, list(hooks)), torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1]
            first = logits if first is None else first
            ids = ids + [int(logits.argmax())]
    return first, ids[len(tok(prompt)["input_ids"]):]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("llama")


def names_for(model, kind):
    n = model.config.num_hidden_layers
    return [kind] if kind in GLOBAL else [f"blocks.{i}.{kind}" for i in range(n)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS + GLOBAL)
def test_replacing_hook_equals_hf(tiny, backend, kind):
    model, tok = tiny
    eng = engine_for(model, tok, backend)
    hooks = [(name, replacing(i)) for i, name in enumerate(names_for(model, kind))]
    ref_logits, ref_tokens = hf_greedy(model, tok, PROMPTS[0], 8, hooks)
    _, plain_tokens = hf_greedy(model, tok, PROMPTS[0], 8)
    assert ref_tokens != plain_tokens or kind == "ln_final.hook_normalized"  # the hook really changes things
    with eng.intervene(hooks=hooks):
        session = eng.start([tok(PROMPTS[0])["input_ids"]], 0)
        [res] = eng.generate([PROMPTS[0]], GenerationConfig(max_new_tokens=8, ignore_eos=True))
    torch.testing.assert_close(session.logits[0], ref_logits, atol=2e-5, rtol=2e-5)
    assert res.token_ids == ref_tokens
    assert eng.backend.name == ("hf" if backend == "hf" else "packed-llama")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS + GLOBAL)
def test_reading_hook_sees_hf_activations(tiny, backend, kind):
    model, tok = tiny
    eng = engine_for(model, tok, backend)
    name = names_for(model, kind)[-1]
    ref, got = [], []
    ids = tok(PROMPTS[0])["input_ids"]
    with Hooks(model, [(name, reading(ref))]), torch.no_grad():
        model(torch.tensor([ids]))
    with eng.intervene(hooks=[(name, reading(got))]):
        eng.start([ids], 0)
    assert len(got) == 1, "the reading hook must run exactly once per forward"
    torch.testing.assert_close(got[0], ref[0], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hooks_context_around_generate_is_honoured(tiny, backend):
    """A user's ``with Hooks(model, ...)`` around ``generate`` counts on every backend (never ignored)."""
    model, tok = tiny
    eng = engine_for(model, tok, backend)
    hooks = [("blocks.1.hook_resid_post", replacing(3)), ("blocks.0.mlp.hook_post", replacing(4))]
    _, ref_tokens = hf_greedy(model, tok, PROMPTS[0], 8, hooks)
    with Hooks(model, hooks):
        [res] = eng.generate([PROMPTS[0]], GenerationConfig(max_new_tokens=8, ignore_eos=True))
    assert res.token_ids == ref_tokens
    [plain] = eng.generate([PROMPTS[0]], GenerationConfig(max_new_tokens=8, ignore_eos=True))
    assert plain.token_ids != ref_tokens


def test_default_backend_follows_hf_backend_with_hook(tiny):
    """The motivating case: the default backend and backend='hf' agree under a replacing hook."""
    model, tok = tiny
    push = torch.randn(64, generator=torch.Generator().manual_seed(5)) * 3
    hooks = [("blocks.0.hook_resid_post", lambda act, hook: act + push)]  # not scale-only: RMSNorm follows
    cfg = GenerationConfig(max_new_tokens=10, ignore_eos=True)
    outs = []
    for eng in (Engine(model, tok), Engine(model, tok, backend="hf")):
        with Hooks(model, hooks):
            outs.append([r.token_ids for r in eng.generate(PROMPTS, cfg)])
    assert outs[0] == outs[1]
    assert outs[0] != [r.token_ids for r in Engine(model, tok).generate(PROMPTS, cfg)]


def test_pattern_hook_switches_auto_and_refuses_packed(tiny):
    model, tok = tiny
    seen = []
    hooks = [("blocks.0.attn.hook_pattern", reading(seen))]
    eng = Engine(model, tok)
    with eng.intervene(hooks=hooks):
        eng.generate(["hi"], GenerationConfig(max_new_tokens=2))
    assert eng.backend.name == "hf" and seen and seen[0].shape[1] == model.config.num_attention_heads
    eng.generate(["hi"], GenerationConfig(max_new_tokens=2))
    assert eng.backend.name == "packed-llama"  # back once the hook is gone
    packed = Engine(model, tok, backend="packed-llama")
    with packed.intervene(hooks=hooks), pytest.raises(ValueError, match="attention patterns"):
        packed.generate(["hi"], GenerationConfig(max_new_tokens=2))


def test_raw_torch_hook_switches_auto_and_refuses_packed(tiny):
    model, tok = tiny
    push = torch.randn(64, generator=torch.Generator().manual_seed(6)) * 3

    def raw(_module, _args, out):
        return out + push if isinstance(out, torch.Tensor) else (out[0] + push, *out[1:])
    handle = model.model.layers[0].register_forward_hook(raw)
    try:
        cfg = GenerationConfig(max_new_tokens=6, ignore_eos=True)
        auto = Engine(model, tok).generate(["hi"], cfg)[0].token_ids
        hf = Engine(model, tok, backend="hf").generate(["hi"], cfg)[0].token_ids
        assert auto == hf
        with pytest.raises(ValueError, match="torch hooks on model.layers.0"):
            Engine(model, tok, backend="packed-llama").generate(["hi"], cfg)
    finally:
        handle.remove()
    assert Engine(model, tok).generate(["hi"], cfg)[0].token_ids != hf


def adder(v):
    return lambda act, hook: act + v


def offset_vectors(model, n_rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = model.config.hidden_size
    return {f"blocks.{i}.{k}": torch.randn(n_rows, d, generator=g) * 2
            for i in range(model.config.num_hidden_layers) for k in ("hook_resid_pre", "hook_resid_post")}


@pytest.mark.parametrize("backend", BACKENDS)
def test_offsets_equal_hf_adding_hooks(tiny, backend):
    model, tok = tiny
    eng = engine_for(model, tok, backend)
    offsets = {k: v[0] for k, v in offset_vectors(model, 1).items()}
    hooks = [(name, adder(v)) for name, v in offsets.items()]
    ref_logits, ref_tokens = hf_greedy(model, tok, PROMPTS[0], 8, hooks)
    with eng.intervene(offsets=offsets):
        session = eng.start([tok(PROMPTS[0])["input_ids"]], 0)
        [res] = eng.generate([PROMPTS[0]], GenerationConfig(max_new_tokens=8, ignore_eos=True))
    torch.testing.assert_close(session.logits[0], ref_logits, atol=2e-5, rtol=2e-5)
    assert res.token_ids == ref_tokens
    _, plain = hf_greedy(model, tok, PROMPTS[0], 8)
    assert plain != ref_tokens


@pytest.mark.parametrize("backend", BACKENDS)
def test_offsets_per_row_equal_each_row_alone(tiny, backend):
    model, tok = tiny
    eng = engine_for(model, tok, backend)
    prompts = ["hello there friend", "a", "the sea is"]
    per_row = offset_vectors(model, 3, seed=1)
    for v in per_row.values():
        v[2] = 0  # the last request is not steered
    cfg = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    with eng.intervene(Interventions(per_row)):
        batch = [r.token_ids for r in eng.generate(prompts, cfg)]
    alone = []
    for i, p in enumerate(prompts):
        with eng.intervene(offsets={k: v[i] for k, v in per_row.items()}):
            alone.append(eng.generate([p], cfg)[0].token_ids)
    assert batch == alone
    assert batch[2] == eng.generate([prompts[2]], cfg)[0].token_ids
    assert batch[0] != eng.generate([prompts[0]], cfg)[0].token_ids


def test_offsets_follow_beams(tiny):
    """Beam search reorders cache rows; per-request offsets must follow their request."""
    from workbench.engine import BeamConfig

    model, tok = tiny
    eng = Engine(model, tok)
    prompts = ["hello there", "the sea"]
    per_row = offset_vectors(model, 2, seed=2)
    cfg = BeamConfig(num_beams=3, max_new_tokens=6)
    with eng.intervene(Interventions(per_row)):
        batch = [r.token_ids for r in eng.generate(prompts, cfg, strategy="beam")]
    for i, p in enumerate(prompts):
        with eng.intervene(offsets={k: v[i] for k, v in per_row.items()}):
            assert eng.generate([p], cfg, strategy="beam")[0].token_ids == batch[i]


def test_interventions_bad_input(tiny):
    model, tok = tiny
    eng = Engine(model, tok)
    with pytest.raises(ValueError, match="hook_resid_pre or"):
        Interventions({"blocks.0.mlp.hook_post": torch.zeros(64)})
    with pytest.raises(ValueError, match="non-finite"):
        Interventions({"blocks.0.hook_resid_post": torch.full((64,), float("nan"))})
    with eng.intervene(offsets={"blocks.9.hook_resid_post": torch.zeros(64)}), pytest.raises(ValueError,
                                                                                              match="2 layers"):
        eng.generate(["hi"])
    with eng.intervene(offsets={"blocks.0.hook_resid_post": torch.zeros(32)}), pytest.raises(ValueError,
                                                                                              match="size 32"):
        eng.generate(["hi"])
    with eng.intervene(offsets={"blocks.0.hook_resid_post": torch.zeros(3, 64)}), pytest.raises(ValueError,
                                                                                                 match="3 rows"):
        eng.generate(["hi", "there"])
    with eng.intervene(hooks=[("blocks.0.hook_nope", lambda a, h: None)]), pytest.raises(KeyError, match="unknown"):
        eng.generate(["hi"])
    assert not eng.interventions  # every block removed itself, errors included


def test_nested_intervene_blocks_add_up(tiny):
    model, tok = tiny
    eng = Engine(model, tok)
    v = torch.randn(64)
    ids = [tok("hello")["input_ids"]]
    with eng.intervene(offsets={"blocks.1.hook_resid_post": v}), eng.intervene(
            offsets={"blocks.1.hook_resid_post": v}):
        nested = eng.start(ids, 0).logits
    with eng.intervene(offsets={"blocks.1.hook_resid_post": 2 * v}):
        double = eng.start(ids, 0).logits
    torch.testing.assert_close(nested, double, atol=1e-5, rtol=1e-5)


def test_weight_edit_is_seen_by_packed_backend(tiny):
    model, tok = tiny
    eng = Engine(model, tok)
    cfg = GenerationConfig(max_new_tokens=6, ignore_eos=True)
    before = eng.generate(["hi"], cfg)[0].token_ids
    w = model.model.layers[0].mlp.down_proj.weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w.mul_(-3)
        edited = eng.generate(["hi"], cfg)[0].token_ids
        assert edited == Engine(model, tok, backend="hf").generate(["hi"], cfg)[0].token_ids
        assert edited != before
    finally:
        with torch.no_grad():
            w.copy_(saved)


@pytest.mark.realmodel
@pytest.mark.parametrize("backend", ("hf", "packed-native"))
def test_smollm2_hooks_and_offsets_equal_hf(smollm2, backend):
    """Every hook kind at once (replacing at three layers, reading at one), plus an offset, on SmolLM2."""
    model, tok = smollm2
    eng = engine_for(model, tok, backend)
    ids = tok("The capital of France is")["input_ids"]
    layers = (3, 15, 27)
    hooks = [(f"blocks.{i}.{k}", replacing(j * 10 + i)) for j, k in enumerate(KINDS) for i in layers]
    hooks += [(k, replacing(99 + j)) for j, k in enumerate(GLOBAL)]
    vec = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.5
    ref_read, got_read = [], []
    ref_hooks = hooks + [("blocks.10.hook_resid_post", lambda act, hook: act + vec),
                         ("blocks.20.hook_resid_pre", reading(ref_read))]
    ref_logits, ref_tokens = hf_greedy(model, tok, "The capital of France is", 6, ref_hooks)
    with eng.intervene(offsets={"blocks.10.hook_resid_post": vec},
                       hooks=hooks + [("blocks.20.hook_resid_pre", reading(got_read))]):
        session = eng.start([ids], 0)
        [res] = eng.generate([ids], GenerationConfig(max_new_tokens=6, ignore_eos=True))
    torch.testing.assert_close(session.logits[0], ref_logits, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(got_read[0], ref_read[0], atol=2e-4, rtol=2e-4)
    assert res.token_ids == ref_tokens
    assert ref_tokens != hf_greedy(model, tok, "The capital of France is", 6)[1]  # the hooks change the output


def test_nested_blocks_at_one_point_exit_cleanly(tiny):
    model, tok = tiny
    eng = Engine(model, tok)
    a, b = torch.randn(64), torch.randn(64)
    with eng.intervene(offsets={"blocks.0.hook_resid_post": a}):
        with eng.intervene(offsets={"blocks.0.hook_resid_post": b}):
            pass
        assert len(eng._interventions) == 1 and eng._interventions[0].offsets["blocks.0.hook_resid_post"] is a
    assert not eng.interventions
    with pytest.raises(ValueError, match="not both"), eng.intervene(Interventions(), offsets={"x": a}):
        pass


def test_transformers_output_capturing_hooks_do_not_block_the_packed_backend(tiny):
    model, tok = tiny
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), output_hidden_states=True, output_attentions=True)
    eng = Engine(model, tok)
    eng.generate(["hi"], GenerationConfig(max_new_tokens=2))
    assert eng.backend.name == "packed-llama"
    Engine(model, tok, backend="packed-llama").generate(["hi"], GenerationConfig(max_new_tokens=2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_hooks_opened_after_the_session_starts_count(tiny, backend):
    model, tok = tiny
    eng = engine_for(model, tok, backend)
    ids = tok("hello")["input_ids"]

    def last_only(act, hook):  # the prompt ran unhooked: change only the newest position
        out = act.clone()
        out[:, -1] = out[:, -1] * 1.7 + 0.5
        return out
    hooks = [("blocks.0.hook_resid_post", last_only)]
    session = eng.start([ids], 2)
    with Hooks(model, hooks):
        got = session.decode(torch.tensor([5]))
        with torch.no_grad():
            ref = model(torch.tensor([ids + [5]])).logits[0, -1]
    torch.testing.assert_close(got[0], ref, atol=2e-5, rtol=2e-5)
    after = session.decode(torch.tensor([6]))  # the context has closed: plain forward again
    with torch.no_grad():
        plain = model(torch.tensor([ids + [5, 6]])).logits[0, -1]
    assert not torch.allclose(after[0], plain, atol=1e-3)  # its cache holds the hooked step
    assert not got.requires_grad and not after.requires_grad


def test_stream_keeps_the_interventions_of_its_call(tiny):
    model, tok = tiny
    eng = Engine(model, tok)
    cfg = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    offsets = {k: v[0] for k, v in offset_vectors(model, 1, seed=3).items()}
    with eng.intervene(offsets=offsets):
        steered = eng.generate(["hello"], cfg)[0].token_ids
        events = eng.stream(["hello"], cfg)
    assert [e.token_id for e in events] == steered != eng.generate(["hello"], cfg)[0].token_ids


@pytest.mark.parametrize("backend", BACKENDS)
def test_external_resid_mid_with_engine_resid_pre_offset(tiny, backend):
    """A Hooks context on resid_mid sees the residual after the engine's resid_pre offset, on every backend."""
    model, tok = tiny
    ids = [tok("hello there")["input_ids"]]
    v = torch.randn(64, generator=torch.Generator().manual_seed(8)) * 2
    out = {}
    for name in ("hf", backend):
        eng = engine_for(model, tok, name)
        with Hooks(model, [("blocks.1.hook_resid_mid", replacing(9))]), eng.intervene(
                offsets={"blocks.1.hook_resid_pre": v}):
            out[name] = eng.start(ids, 0).logits
    ref_hooks = [("blocks.1.hook_resid_pre", adder(v)), ("blocks.1.hook_resid_mid", replacing(9))]
    with Hooks(model, ref_hooks), torch.no_grad():
        ref = model(torch.tensor(ids)).logits[:, -1]
    torch.testing.assert_close(out["hf"], ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out[backend], ref, atol=2e-5, rtol=2e-5)


def test_sliding_window_caches_refuse_rollback_and_mcts_recomputes():
    from transformers import MistralConfig, MistralForCausalLM

    from workbench.engine import SpeculativeConfig
    from workbench.engine.mcts import EngineLM
    from workbench.models.tiny import byte_tokenizer

    tok = byte_tokenizer()
    cfg = MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = MistralForCausalLM(cfg).eval()
    eng = Engine(model, tok, backend="hf")
    session = eng.start([tok("hello there friend")["input_ids"]], 8)
    if session.rollback_refusal is None:
        pytest.skip("this transformers version builds no sliding-window cache layers for Mistral")
    with pytest.raises(ValueError, match="cannot roll back"):
        session.rollback(0, 1)
    with pytest.raises(ValueError, match="rolls back rejected drafts"):
        eng.generate(["hello"], SpeculativeConfig(max_new_tokens=4), strategy="speculative")
    lm = EngineLM(eng, max_len=32)
    for s in ([5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [5, 6, 7, 8, 9, 10, 11, 12, 13, 1]):
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([s])).logits[0, -1], -1)
        torch.testing.assert_close(lm.next_logprobs(s), ref, atol=1e-5, rtol=1e-5)
    assert lm.reused_tokens == 0  # each sequence runs anew: no prefix reuse past a sliding window


def test_residual_constructor_places_one_vector_per_layer(tiny):
    model, tok = tiny
    v = torch.randn(64, generator=torch.Generator().manual_seed(11))
    iv = Interventions.residual({0: v, 1: -v}, point="hook_resid_pre")
    assert set(iv.offsets) == {"blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"}
    eng = Engine(model, tok)
    ids = [tok("hello")["input_ids"]]
    with eng.intervene(iv):
        a = eng.start(ids, 0).logits
    with eng.intervene(offsets={"blocks.0.hook_resid_pre": v, "blocks.1.hook_resid_pre": -v}):
        b = eng.start(ids, 0).logits
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, eng.start(ids, 0).logits, atol=1e-3)
    with pytest.raises(ValueError, match="point must be one of"):
        Interventions.residual({0: v}, point="hook_mlp_out")
