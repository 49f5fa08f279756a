"""Control vectors: value semantics, training parity with repeng, llama.cpp files both ways, steering through the
engine equal to hooks on the HF forward and to repeng's ControlModel, per-request vectors, CLI helpers."""

import argparse
import contextlib
import copy

import numpy as np
import pytest
import torch
from test_interventions import hf_greedy

from workbench.engine import Engine, GenerationConfig
from workbench.errors import UnknownNameError
from workbench.interp import Hooks
from workbench.interp.hooks import active_hooks, count_hooks, foreign_hooks
from workbench.models.tiny import build_tiny
from workbench.surgery.control import ControlVector, DatasetEntry, collect_hiddens, resolve_layers
from workbench.surgery.steer import add_control_args, batch_offsets, control_context, offsets_for, steer

PERSONAS = [("happy", "sad"), ("joyful", "miserable"), ("cheerful", "gloomy"), ("delighted", "depressed")]
SUFFIXES = ["I feel", "Today was", "The weather is", "My friend said"]
ENTRIES = [DatasetEntry(f"Act as if you are extremely {p}. {s}", f"Act as if you are extremely {n}. {s}")
           for p, n in PERSONAS for s in SUFFIXES]
PROMPT = "Tell me about your day."


@pytest.fixture(scope="module")
def tiny4():
    """A tiny random Llama with 4 layers (the stock tiny one has 2: one trainable layer only)."""
    from transformers import AutoModelForCausalLM

    model, tok = build_tiny("llama")
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = 4
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model, tok


@pytest.fixture(scope="module")
def repeng():
    return pytest.importorskip("repeng")


def vec(model_type="llama", **layers):
    return ControlVector(model_type, {int(k[1:]): torch.tensor(v, dtype=torch.float32) for k, v in layers.items()})


def cosine(a, b):
    a, b = torch.as_tensor(np.asarray(a), dtype=torch.float64), torch.as_tensor(np.asarray(b), dtype=torch.float64)
    return float(a @ b / (a.norm() * b.norm()))


def to_repeng(repeng, v: ControlVector):
    return repeng.ControlVector(v.model_type, {k: t.numpy().copy() for k, t in v.directions.items()})


def snapshot(model):
    return {k: t.detach().clone() for k, t in model.state_dict().items()}


def assert_unchanged(model, before, layer_types):
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [type(m) for m in model.model.layers] == layer_types
    assert foreign_hooks(model) == [] and active_hooks(model) == []  # transformers' inert capture hooks aside


# -- value object -------------------------------------------------------------------------------------------
def test_arithmetic_and_equality():
    a = vec(l1=[1.0, 2.0], l2=[3.0, 4.0])
    b = vec(l2=[1.0, 1.0], l3=[0.5, -0.5])
    assert a + b == vec(l1=[1.0, 2.0], l2=[4.0, 5.0], l3=[0.5, -0.5])  # union; a missing layer is zero
    assert a - b == vec(l1=[1.0, 2.0], l2=[2.0, 3.0], l3=[-0.5, 0.5])
    assert 2 * a == a * 2 == vec(l1=[2.0, 4.0], l2=[6.0, 8.0])
    assert a / 2 == vec(l1=[0.5, 1.0], l2=[1.5, 2.0])
    assert -a == vec(l1=[-1.0, -2.0], l2=[-3.0, -4.0])
    assert a * torch.tensor(3.0) == 3 * a and a * np.float32(3) == 3 * a
    assert sum([a, b]) == a + b
    assert a == vec(l2=[3.0, 4.0], l1=[1.0, 2.0])  # key order does not matter
    assert a != vec(l1=[1.0, 2.0], l2=[3.0, 4.000001])
    assert a != vec(l1=[1.0, 2.0])
    assert a != vec("gpt2", l1=[1.0, 2.0], l2=[3.0, 4.0])
    assert a.layers == [1, 2] and a.d_model == 2
    with pytest.raises(TypeError):
        a + 1.0
    with pytest.raises(TypeError):
        a * a
    with pytest.raises(ValueError, match="combine"):
        a + vec("gpt2", l1=[1.0, 2.0])
    with pytest.raises(ValueError, match="size"):
        vec(l1=[1.0], l2=[1.0, 2.0])
    with pytest.raises(ZeroDivisionError):
        a / 0
    e = DatasetEntry(positive="x", negative="y")
    assert (e.positive, e.negative) == ("x", "y")


# -- training -----------------------------------------------------------------------------------------------
def test_layers_follow_repeng(tiny4):
    model, tok = tiny4
    assert resolve_layers(model, None) == [1, 2, 3]  # repeng: range(-1, -n_layers, -1), layer 0 skipped
    assert resolve_layers(model, [-1, -3, 0]) == [0, 1, 3]
    with pytest.raises(ValueError):
        resolve_layers(model, [4])
    with pytest.raises(UnknownNameError, match="pca_diff"):
        ControlVector.train(model, tok, ENTRIES, method="pca-diff")


def test_states_are_layer_outputs(tiny4):
    """Key i reads the output of decoder layer i (blocks.i.hook_resid_post) at the last token, whatever the
    padding; the last layer reads HF's hidden_states[-1] (after the final norm), as repeng does."""
    model, tok = tiny4
    texts = [ENTRIES[0].positive, "short", ENTRIES[5].negative]
    got = collect_hiddens(model, tok, texts, [0, 1, 2, 3], batch_size=3, progress=False)
    one = collect_hiddens(model, tok, texts, [0, 1, 2, 3], batch_size=1, progress=False)
    for layer in range(4):
        torch.testing.assert_close(got[layer], one[layer], atol=1e-5, rtol=1e-5)
    def keep(seen, key):
        return lambda act, hook: seen.__setitem__(key, act[0, -1])

    for r, text in enumerate(texts):
        seen = {}
        hooks = [(f"blocks.{i}.hook_resid_post", keep(seen, i)) for i in range(4)]
        hooks.append(("ln_final.hook_normalized", keep(seen, "norm")))
        with Hooks(model, hooks), torch.no_grad():
            out = model(torch.tensor([tok(text)["input_ids"]]), output_hidden_states=True)
        for i in range(3):
            torch.testing.assert_close(got[i][r], seen[i], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got[i][r], out.hidden_states[i + 1][0, -1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[3][r], seen["norm"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[3][r], out.hidden_states[4][0, -1], atol=1e-5, rtol=1e-5)


def test_training_leaves_the_model_alone():
    model, tok = build_tiny("llama")
    before = snapshot(model)
    v = ControlVector.train(model, tok, ENTRIES[:4], progress=False)
    assert v.layers == [1] and count_hooks(model) == 0
    assert ControlVector.train(Engine(model, tok), tok, ENTRIES[:4], progress=False) == v  # an engine's model
    with pytest.raises(ValueError, match="DatasetEntry"):
        ControlVector.train(model, tok, [("happy", "sad")])
    with pytest.raises(ValueError, match="2 entries"):
        ControlVector.train(model, tok, ENTRIES[:1])
    assert all(torch.equal(t, before[k]) for k, t in model.state_dict().items())


@pytest.mark.parametrize("method", ["pca_diff", "pca_center"])
def test_pca_matches_repeng(tiny4, method, repeng):
    model, tok = tiny4
    ours = ControlVector.train(model, tok, ENTRIES, method=method, batch_size=5, progress=False)
    ref = repeng.ControlVector.train(model, tok, [repeng.DatasetEntry(e.positive, e.negative) for e in ENTRIES],
                                     method=method, batch_size=5)
    assert ours.model_type == ref.model_type == "llama"
    assert sorted(ours.directions) == sorted(ref.directions) == [1, 2, 3]
    for layer, d in ours.directions.items():
        assert cosine(d, ref.directions[layer]) >= 0.9999, layer  # signed: same sign as repeng
        assert abs(float(d.norm()) - 1) < 1e-5


def test_mean_diff_is_caa(tiny4):
    model, tok = tiny4
    v = ControlVector.train(model, tok, ENTRIES, method="mean_diff", layers=[1, -1], progress=False)
    texts = [s for e in ENTRIES for s in (e.positive, e.negative)]
    h = collect_hiddens(model, tok, texts, [1, 3], progress=False)
    for layer in (1, 3):
        torch.testing.assert_close(v.directions[layer], (h[layer][0::2] - h[layer][1::2]).mean(0))


def test_sign_vote(tiny4):
    """Swapping positives and negatives flips every direction."""
    model, tok = tiny4
    v = ControlVector.train(model, tok, ENTRIES, progress=False)
    w = ControlVector.train(model, tok, [DatasetEntry(e.negative, e.positive) for e in ENTRIES], progress=False)
    for layer in v.layers:
        assert cosine(v.directions[layer], w.directions[layer]) <= -0.9999


# -- llama.cpp files ----------------------------------------------------------------------------------------
def test_gguf_interop_with_repeng(tmp_path, repeng):
    import gguf

    g = torch.Generator().manual_seed(0)
    ours = ControlVector("llama", {i: torch.randn(64, generator=g) for i in (1, 2, 5)})
    ours.export_gguf(tmp_path / "ours.gguf")
    reader = gguf.GGUFReader(tmp_path / "ours.gguf")
    assert bytes(reader.get_field("general.architecture").parts[-1]) == b"controlvector"
    assert bytes(reader.get_field("controlvector.model_hint").parts[-1]) == b"llama"
    assert int(reader.get_field("controlvector.layer_count").parts[-1][0]) == 3
    assert {t.name: (t.tensor_type, t.shape.tolist()) for t in reader.tensors} == {
        f"direction.{i}": (gguf.GGMLQuantizationType.F32, [64]) for i in (1, 2, 5)}
    theirs = repeng.ControlVector.import_gguf(tmp_path / "ours.gguf")
    assert theirs.model_type == "llama" and sorted(theirs.directions) == [1, 2, 5]
    for i, d in ours.directions.items():
        assert np.array_equal(theirs.directions[i], d.numpy())
    assert ControlVector.import_gguf(tmp_path / "ours.gguf") == ours

    ref = repeng.ControlVector("qwen2", {i: np.random.default_rng(i).standard_normal(32).astype(np.float32)
                                         for i in (3, 1, 7)})
    ref.export_gguf(tmp_path / "repeng.gguf")
    back = ControlVector.import_gguf(tmp_path / "repeng.gguf")
    assert back == ControlVector("qwen2", {k: torch.from_numpy(v) for k, v in ref.directions.items()})


def test_gguf_refusals(tmp_path):
    with pytest.raises(ValueError, match="direction.0"):
        vec(l0=[1.0, 2.0], l1=[1.0, 1.0]).export_gguf(tmp_path / "x.gguf")
    import gguf

    w = gguf.GGUFWriter(tmp_path / "model.gguf", "llama")
    w.add_tensor("token_embd.weight", np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="not a control vector"):
        ControlVector.import_gguf(tmp_path / "model.gguf")


# -- steering -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny4_vector(tiny4):
    model, tok = tiny4
    return ControlVector.train(model, tok, ENTRIES, progress=False)


@pytest.mark.parametrize("backend", ["auto", "hf"])
def test_engine_steering_equals_hf_hook(tiny4, tiny4_vector, backend):
    model, tok = tiny4
    before, types = snapshot(model), [type(m) for m in model.model.layers]
    eng = Engine(model, tok, backend=backend)
    strength = 6.0
    hooks = [(f"blocks.{i}.hook_resid_post", (lambda v: lambda act, hook: act + v)(strength * d))
             for i, d in tiny4_vector.directions.items()]
    ref_logits, ref_tokens = hf_greedy(model, tok, PROMPT, 10, hooks)
    _, plain_tokens = hf_greedy(model, tok, PROMPT, 10)
    assert ref_tokens != plain_tokens  # the vector really steers
    cfg = GenerationConfig(max_new_tokens=10, ignore_eos=True)
    with steer(eng, tiny4_vector, strength) as same:
        assert same is eng
        session = eng.start([tok(PROMPT)["input_ids"]], 0)
        [res] = eng.generate([PROMPT], cfg)
    torch.testing.assert_close(session.logits[0], ref_logits, atol=2e-5, rtol=2e-5)
    assert res.token_ids == ref_tokens
    assert not eng.interventions
    assert eng.generate([PROMPT], cfg)[0].token_ids == plain_tokens
    with steer(model, tiny4_vector, strength):  # a bare HF model: hooks
        logits, tokens = hf_greedy(model, tok, PROMPT, 10)
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=2e-5)
    assert tokens == ref_tokens
    assert_unchanged(model, before, types)


def test_steering_is_removed_on_error(tiny4, tiny4_vector):
    model, tok = tiny4
    eng = Engine(model, tok)
    for target in (eng, model):
        with pytest.raises(RuntimeError), steer(target, tiny4_vector, 2.0):
            raise RuntimeError("boom")
    assert not eng.interventions and foreign_hooks(model) == [] and active_hooks(model) == []
    bad = ControlVector("llama", {9: torch.zeros(64)})
    with pytest.raises(ValueError, match="layers"), steer(eng, bad, 1.0):
        pass
    with pytest.raises(ValueError, match="size"), steer(model, ControlVector("llama", {1: torch.zeros(8)}), 1.0):
        pass


def assert_steering_equals_repeng(repeng, model, tok, vector, ids: list[int], strength: float, n: int):
    """repeng's ControlModel (unwrapped after) and our engine under steer() give the same greedy tokens, which
    differ from unsteered ones; the model is left as it was."""
    before, types = snapshot(model), [type(m) for m in model.model.layers]
    cm = repeng.ControlModel(model, list(vector.directions))
    try:
        cm.set_control(to_repeng(repeng, vector), strength)
        t = torch.tensor([ids])
        with torch.no_grad():
            theirs = cm.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=n, do_sample=False,
                                 eos_token_id=None, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        cm.reset()
    finally:
        cm.unwrap()
    assert_unchanged(model, before, types)
    eng = Engine(model, tok)
    cfg = GenerationConfig(max_new_tokens=n, ignore_eos=True)
    with steer(eng, vector, strength):
        steered = eng.generate([ids], cfg)[0].token_ids
    assert steered == theirs
    assert steered != eng.generate([ids], cfg)[0].token_ids
    assert_unchanged(model, before, types)


def test_engine_steering_equals_repeng_control_model(tiny4, tiny4_vector, repeng):
    """repeng adds strength * direction to layer i's output; ours goes to blocks.i.hook_resid_post (no shift)."""
    model, tok = tiny4
    assert_steering_equals_repeng(repeng, model, tok, tiny4_vector, tok(PROMPT)["input_ids"], 6.0, 12)


def test_per_request_vectors_in_one_batch(tiny4, tiny4_vector):
    model, tok = tiny4
    other = ControlVector("llama", {2: tiny4_vector.directions[2] * -1, 3: tiny4_vector.directions[1]})
    per_request = [(tiny4_vector, 6.0), None, (other, 4.0), (tiny4_vector, -6.0)]
    prompts = [PROMPT, "hello there friend", "a", "the sea is"]
    offsets = batch_offsets(per_request)
    assert sorted(offsets) == [f"blocks.{i}.hook_resid_post" for i in (1, 2, 3)]
    assert offsets["blocks.1.hook_resid_post"].shape == (4, 64)
    assert torch.equal(offsets["blocks.1.hook_resid_post"][2], torch.zeros(64))  # `other` lacks layer 1
    eng = Engine(model, tok)
    cfg = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    with steer(eng, per_request):
        batch = [r.token_ids for r in eng.generate(prompts, cfg)]
    alone = []
    for p, item in zip(prompts, per_request, strict=True):
        ctx = steer(eng, *item) if item is not None else contextlib.nullcontext()
        with ctx:
            alone.append(eng.generate([p], cfg)[0].token_ids)
    assert batch == alone
    assert batch[0] != eng.generate([prompts[0]], cfg)[0].token_ids
    assert offsets_for(tiny4_vector, 2.0)["blocks.3.hook_resid_post"].equal(2.0 * tiny4_vector.directions[3])
    ids = torch.tensor([tok("hello there")["input_ids"], tok("the sea is!")["input_ids"]])  # same length
    with steer(model, [(tiny4_vector, 6.0), None]), torch.no_grad():  # a bare model: one row per batch row
        rows = model(ids).logits
    with torch.no_grad():
        with steer(model, tiny4_vector, 6.0):
            first = model(ids[:1]).logits
        second = model(ids[1:]).logits
    torch.testing.assert_close(rows, torch.cat([first, second]), atol=1e-5, rtol=1e-5)


def test_cli_helpers(tiny4, tiny4_vector, tmp_path):
    model, tok = tiny4
    eng = Engine(model, tok)
    parser = add_control_args(argparse.ArgumentParser())
    args = parser.parse_args([])
    assert isinstance(control_context(args, eng), contextlib.nullcontext)
    with pytest.raises(ValueError, match="--control-vector"):
        control_context(parser.parse_args(["--strength", "2"]), eng)
    tiny4_vector.export_gguf(tmp_path / "v.gguf")
    args = parser.parse_args(["--control-vector", str(tmp_path / "v.gguf"), "--strength", "6"])
    cfg = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    with control_context(args, eng):
        got = eng.generate([PROMPT], cfg)[0].token_ids
    with steer(eng, tiny4_vector, 6.0):
        want = eng.generate([PROMPT], cfg)[0].token_ids
    assert got == want and not eng.interventions


# -- SmolLM2 --------------------------------------------------------------------------------------------------
@pytest.mark.realmodel
@pytest.mark.slow
def test_smollm2_matches_repeng(smollm2, repeng):
    """pca_diff on every layer (1..29) against repeng's train, and steered greedy generation against repeng's
    ControlModel at the same strength; the model is left as it was."""
    model, tok = smollm2
    entries = ENTRIES[::2]  # 8 pairs
    before, types = snapshot(model), [type(m) for m in model.model.layers]
    ours = ControlVector.train(model, tok, entries, progress=False)
    ref = repeng.ControlVector.train(model, tok, [repeng.DatasetEntry(e.positive, e.negative) for e in entries])
    assert sorted(ours.directions) == sorted(ref.directions) == list(range(1, model.config.num_hidden_layers))
    cos = {layer: cosine(d, ref.directions[layer]) for layer, d in ours.directions.items()}
    assert min(cos.values()) >= 0.99, cos
    assert_unchanged(model, before, types)  # training left no hooks or wrappers behind

    from workbench.chat import prompt_ids

    ids = prompt_ids(tok, [{"role": "user", "content": "Describe your morning."}])
    assert_steering_equals_repeng(repeng, model, tok, ours, ids, 4.0, 16)
