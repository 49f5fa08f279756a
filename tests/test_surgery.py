"""Knowledge editing (workbench.surgery): requests, statistics, ROME / MEMIT / AlphaEdit / FT-L, undo, save.

Unit tests run on tiny random models; ``realmodel`` tests edit SmolLM2-135M-Instruct."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from workbench.errors import UnknownNameError, WorkbenchError
from workbench.models.tiny import build_tiny
from workbench.surgery import Editor, EditRequest, edit_model, load_edit
from workbench.surgery.compute import compute_keys, down_proj, down_weight
from workbench.surgery.hparams import HparamsError, load_hparams
from workbench.surgery.metrics import score_pairs
from workbench.surgery.requests import BadRequestError, load_requests, prompt_ids, save_requests, target_ids
from workbench.surgery.stats import compute_stats

# the subject ends the prompt, so the value shift acts on the position that predicts the target
REQ = EditRequest(prompt="The tower stands in the city of Eiffel", subject="Eiffel", target_new="Q")
OTHER = EditRequest(prompt="A famous bridge crosses the river at Brooklyn", subject="Brooklyn", target_new="Z")
STATS = dict(corpus="gpl-3", tokens=4096, seq_len=128, batch_size=8, progress=False)
# strong value optimisation for random weights; no prefixes unless a test asks (then k* is the prompt's key)
VALUE = dict(v_steps=40, v_lr=0.5, clamp_norm_factor=50.0, kl_factor=0.0, n_prefixes=0, stop_loss=1e-3)


def fresh(arch="llama"):
    return build_tiny(arch)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same_weights(model, snap):
    for n, p in model.named_parameters():
        assert torch.equal(p, snap[n]), n


def greedy(model, tok, text, n=2):
    ids = torch.tensor([prompt_ids(tok, text)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def stats_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("stats")


@pytest.fixture(scope="module")
def tiny_stats(stats_dir):
    m, t = fresh()
    return compute_stats(m, t, [0, 1], cache_dir=stats_dir, **STATS)


# --- requests --------------------------------------------------------------------------------------------

def test_request_forms_and_target_space_rule():
    _, tok = fresh()
    r = EditRequest(prompt="The Eiffel Tower is located in the city of", subject="Eiffel Tower", target_new="Rome")
    assert r.template == "The {} is located in the city of" and r.text == r.prompt
    t = EditRequest(prompt="{} is located in", subject="Big Ben", target_new="London")
    assert t.text == "Big Ben is located in" and t.template == "{} is located in"
    # a space is put between prompt and target unless one of them already has it
    assert target_ids(tok, "in the city of", "Rome") == prompt_ids(tok, " Rome")
    assert target_ids(tok, "in the city of ", "Rome") == prompt_ids(tok, "Rome")
    assert target_ids(tok, "in the city of", " Rome") == prompt_ids(tok, " Rome")


def test_request_from_easyedit_and_counterfact(tmp_path):
    e = EditRequest.from_dict({"prompt": "Who wrote Hamlet?", "subject": "Hamlet", "target_new": "Marlowe",
                               "ground_truth": "Shakespeare", "rephrase_prompt": "Hamlet's author is",
                               "locality_prompt": ["Who wrote Faust?"], "locality_ground_truth": [["Goethe"]],
                               "portability_prompt": "Hamlet's author was born in",
                               "portability_ground_truth": "Canterbury"})
    assert e.target_true == "Shakespeare" and e.rephrase_prompts == ["Hamlet's author is"]
    assert e.locality == [("Who wrote Faust?", "Goethe")]
    assert e.portability == [("Hamlet's author was born in", "Canterbury")]
    cf = EditRequest.from_dict({"case_id": 7, "requested_rewrite": {
        "prompt": "{} plays the", "subject": "Miles Davis", "target_new": {"str": "piano"},
        "target_true": {"str": "trumpet"}}, "paraphrase_prompts": ["Miles Davis is known for the"],
        "neighborhood_prompts": ["Chet Baker plays the"]})
    assert (cf.case_id, cf.text, cf.target_new, cf.target_true) == (7, "Miles Davis plays the", "piano", "trumpet")
    assert cf.locality == [("Chet Baker plays the", "trumpet")]
    assert EditRequest.from_dict(cf.to_dict()) == cf
    path = save_requests(tmp_path / "r.jsonl", [e, cf])
    assert load_requests(path) == [e, cf]
    path.write_text(path.read_text() + '{"prompt": "x"}\n')
    with pytest.raises(BadRequestError, match=r"r\.jsonl:3:"):
        load_requests(path)


# --- refusals --------------------------------------------------------------------------------------------

class _DropSnowman:
    """A tokenizer that drops '☃' (so a target of snowmen tokenizes to nothing)."""

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, text, **kw):
        return self.tok(text.replace("☃", ""), **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


@pytest.mark.parametrize("case", ["no-subject", "empty-target", "nothing-target", "unknown-method", "bad-layer",
                                  "bad-layer-list"])
def test_bad_input_refused_before_any_weight_changes(case, tiny_stats):
    m, tok = fresh()
    snap = snapshot(m)
    method, hp, reqs, err = "rome", dict(VALUE, layer=1), [OTHER, REQ], BadRequestError
    if case == "no-subject":
        reqs = [OTHER, EditRequest(prompt="The tower stands in Paris", subject="Eiffel", target_new="Q")]
    elif case == "empty-target":
        reqs = [OTHER, EditRequest(prompt=REQ.prompt, subject="Eiffel", target_new=" ")]
    elif case == "nothing-target":
        tok = _DropSnowman(tok)
        reqs = [OTHER, EditRequest(prompt=REQ.prompt, subject="Eiffel", target_new="☃☃")]
    elif case == "unknown-method":
        method, err = "Rome", UnknownNameError
    elif case == "bad-layer":
        hp, err = dict(VALUE, layer=2), HparamsError
    else:
        method, hp, err = "memit", dict(VALUE, layers=[1, 5]), HparamsError
    with pytest.raises(err) as info:
        edit_model(m, tok, reqs, method=method, hparams=hp, evaluate=False, stats=tiny_stats)
    assert isinstance(info.value, WorkbenchError)
    if case == "unknown-method":
        assert "'rome'" in str(info.value) and "memit" in str(info.value)
    assert_same_weights(m, snap)


def test_failure_half_way_restores_the_weights(tiny_stats, monkeypatch):
    import workbench.surgery.memit as memit_mod

    m, tok = fresh()
    snap = snapshot(m)
    calls = []
    real = memit_mod.compute_keys

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 2:  # after the first layer's update went in
            raise RuntimeError("boom")
        return real(*a, **kw)

    monkeypatch.setattr(memit_mod, "compute_keys", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        edit_model(m, tok, [REQ], method="memit", hparams=dict(VALUE, layers=[0, 1], mom2_weight=1.0),
                   evaluate=False, stats=tiny_stats)
    assert len(calls) == 2
    assert_same_weights(m, snap)


# --- the update equations --------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rome_writes_v_star_at_the_averaged_key(arch, stats_dir):
    """r-ROME: after the edit, the down projection maps the averaged key k* to v* = W k* + δ."""
    m, tok = fresh(arch)
    st = compute_stats(m, tok, [1], cache_dir=stats_dir, **STATS)
    w0 = down_weight(m, 1).detach().clone()
    res = edit_model(m, tok, [REQ], method="rome", hparams=dict(VALUE, layer=1, n_prefixes=3, prefix_len=6),
                     evaluate=False, stats=st)
    assert len(res.info["prefixes"]) == 4 and res.info["prefixes"][1]
    k = compute_keys(m, tok, 1, [REQ], res.info["prefixes"])[0]  # layer 1's keys do not depend on its down proj
    delta = torch.tensor(res.info["requests"][0]["delta"])
    mod = down_proj(m, 1)
    bias = mod.bias if getattr(mod, "bias", None) is not None else 0
    v_star = w0 @ k + bias + delta
    with torch.no_grad():
        got = mod(k[None])[0]
    assert float(delta.norm()) > 1.0  # a real shift, not a no-op
    torch.testing.assert_close(got, v_star, rtol=1e-4, atol=1e-4)
    # the key of the prompt alone differs from k* (prefixes matter), and rank one: ΔW ∝ δ ⊗ (C⁻¹k)
    (name, d), = res.deltas.items()
    assert name.endswith(("mlp.down_proj.weight", "mlp.c_proj.weight"))
    assert torch.linalg.matrix_rank(d.double(), rtol=1e-6) == 1


def _target_nll(model, tok, req, prefixes) -> float:
    """Mean per-token NLL of ``target_new`` after the request in every prefixed context (no hooks)."""
    scores = score_pairs(model, tok, [(p + req.text, req.target_new) for p in prefixes])
    return -sum(s.logp for s in scores) / sum(s.n for s in scores)


@pytest.mark.parametrize("through", [True, False])
def test_rome_value_through_update_predicts_the_edited_model(through, tiny_stats):
    """With value_through_update the optimised loss is the edited model's own target NLL (δ reaches every
    position as (uᵀk) δ, exactly what ΔW adds); δ at the subject token alone mispredicts it (the control)."""
    m, tok = fresh()
    hp = dict(VALUE, layer=1, n_prefixes=2, prefix_len=5, v_steps=6, stop_loss=0.0, clamp_norm_factor=4.0,
              value_through_update=through)
    res = edit_model(m, tok, [REQ], method="rome", hparams=hp, evaluate=False, stats=tiny_stats)
    info = res.info["requests"][0]
    after = _target_nll(m, tok, REQ, res.info["prefixes"])
    assert info["nll"] < info["nll_start"] - 0.1  # the optimisation moved
    if through:
        assert after == pytest.approx(info["nll"], rel=1e-3, abs=1e-4)
    else:
        assert abs(after - info["nll"]) > 1e-2


POOL = ["Paris", "London", "Berlin", "Madrid", "Vienna", "Prague", "Lisbon", "Oslo", "Dublin", "Rome"]


def _template_delta(m, tok, w0, layer, subjects):
    """``ΔW k`` for each subject's key in REQ's template (the keys do not depend on this layer's down proj)."""
    from workbench.surgery.preserve import template_keys

    keys = template_keys(m, tok, layer, REQ.template, subjects).float()
    return (down_weight(m, layer).detach() - w0) @ keys.T  # [d_model, n]


@pytest.mark.parametrize("n", [0, 3])
def test_rome_preserved_subjects_are_the_most_moved_and_keep_their_outputs(n, tiny_stats):
    """preserve_subjects: the update still writes v* at k*, and gives the n subjects the plain update moves most
    (REQ's template with another subject) no change at all; with n = 0 those subjects move (the control)."""
    from workbench.surgery.preserve import most_moved, template_keys
    from workbench.surgery.rome import key_direction

    m, tok = fresh()
    w0 = down_weight(m, 1).detach().clone()
    hp = dict(VALUE, layer=1, preserve_subjects=n, preserve_pool=POOL)
    res = edit_model(m, tok, [REQ], method="rome", hparams=hp, evaluate=False, stats=tiny_stats)
    info = res.info["requests"][0]
    k = compute_keys(m, tok, 1, [REQ], res.info["prefixes"])[0]
    delta = torch.tensor(info["delta"])
    torch.testing.assert_close((down_weight(m, 1).detach() - w0) @ k, delta, rtol=1e-4, atol=1e-4)
    c = tiny_stats.second_moment(1, load_hparams("rome", overrides={"layer": 1}).ridge)
    order = most_moved(key_direction(k, c), template_keys(m, tok, 1, REQ.template, POOL), 3).tolist()
    top = [POOL[i] for i in order]
    moved = _template_delta(m, tok, w0, 1, top).norm(dim=0) / delta.norm()
    if n:
        assert info["preserved"] == top
        assert float(moved.max()) < 1e-4
    else:
        assert info["preserved"] == [] and float(moved.min()) > 1e-2


def test_rome_preserve_refused_without_candidates_and_for_bad_values(tiny_stats):
    """Too few candidates (the byte tokenizer has no word tokens) fails the edit with no weight changed; bad
    preserve fields are refused when the hyperparameters are made."""
    from workbench.surgery.preserve import NoCandidatesError

    m, tok = fresh()
    snap = snapshot(m)
    with pytest.raises(NoCandidatesError, match="candidate subjects"):
        edit_model(m, tok, [REQ], method="rome", hparams=dict(VALUE, layer=1, preserve_subjects=2),
                   evaluate=False, stats=tiny_stats)
    with pytest.raises(NoCandidatesError, match="candidate subjects"):  # "Eiffel" itself is not a candidate
        edit_model(m, tok, [REQ], method="rome", evaluate=False, stats=tiny_stats,
                   hparams=dict(VALUE, layer=1, preserve_subjects=2, preserve_pool=["Paris", "Eiffel"]))
    assert_same_weights(m, snap)
    for bad in ({"preserve_subjects": -1}, {"preserve_subjects": 1.5}, {"preserve_pool": "Paris"},
                {"preserve_pool": ["Paris", ""]}):
        with pytest.raises(HparamsError, match="preserve_"):
            load_hparams("rome", overrides={"layer": 1, **bad})


def test_memit_single_edit_single_layer_is_rome_scaled_by_the_regulariser(tiny_stats):
    """ΔW_MEMIT = ΔW_ROME · kᵀC⁻¹k / (λ + kᵀC⁻¹k) (Sherman–Morrison) for one request and one layer, same C."""
    hp = dict(VALUE, n_prefixes=2, prefix_len=5, ridge=1e-3)
    m1, tok = fresh()
    rome = edit_model(m1, tok, [REQ], method="rome", hparams=dict(hp, layer=1), evaluate=False, stats=tiny_stats)
    m2, _ = fresh()
    k = compute_keys(m2, tok, 1, [REQ], rome.info["prefixes"])[0].double()
    c = tiny_stats.second_moment(1, 1e-3)
    kck = float(k @ torch.linalg.solve(c, k))
    lam = kck  # makes the scale 1/2
    memit = edit_model(m2, tok, [REQ], method="memit", hparams=dict(hp, layers=[1], mom2_weight=lam),
                       evaluate=False, stats=tiny_stats)
    (name, d_rome), = rome.deltas.items()
    d_memit = memit.deltas[name]
    torch.testing.assert_close(d_memit, 0.5 * d_rome, rtol=1e-3, atol=1e-6 * float(d_rome.abs().max()))
    assert float((d_memit - d_rome).abs().max()) > 0.1 * float(d_rome.abs().max())


def _corpus_keys(model, tok, layer, n_windows=8):
    from workbench.surgery.stats import _windows

    wins = list(_windows(tok, "gpl-3", n_windows, 128))
    got = []
    from workbench.interp import Hooks

    with Hooks(model, [(f"blocks.{layer}.mlp.hook_post", lambda a, h: got.append(a.reshape(-1, a.shape[-1])))]), \
            torch.no_grad():
        model(input_ids=torch.tensor(wins))
    return torch.cat(got).double()


def test_alphaedit_update_leaves_preserved_keys_alone(tiny_stats):
    """ΔW K₀ ≈ 0 for the preserved keys: the corpus keys (those the statistics came from) in the span of C's
    eigenvectors above the threshold. MEMIT's update moves them."""
    from workbench.surgery.alphaedit import null_projector

    hp, th = dict(VALUE, layers=[0, 1]), 1e-3
    m, tok = fresh()
    kept = {}
    for i in (0, 1):
        p = null_projector(tiny_stats.second_moment(i), th)
        keys = _corpus_keys(m, tok, i)
        kept[i] = keys - keys @ p  # (I - P) k: the part of each corpus key outside the null space
        assert 0.5 < float(kept[i].norm() / keys.norm()) < 1.0
    alpha = edit_model(m, tok, [REQ], method="alphaedit", hparams=dict(hp, null_threshold=th, l2=1.0),
                       evaluate=False, stats=tiny_stats)
    m2, _ = fresh()
    memit = edit_model(m2, tok, [REQ], method="memit", hparams=dict(hp, mom2_weight=1.0), evaluate=False,
                       stats=tiny_stats)
    for i in (0, 1):
        name = f"model.layers.{i}.mlp.down_proj.weight"

        def leak(d, i=i):
            d = d.double()
            return float((d @ kept[i].T).norm() / (d.norm() * kept[i].norm()))

        assert leak(alpha.deltas[name]) < 1e-5, i
        assert leak(memit.deltas[name]) > 1e-3, i  # measured 5e-3 (layer 1) and more
        assert float(alpha.deltas[name].norm()) > 0.01
    assert alpha.info["requests"][0]["delta_reached"] > 0.1


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_more_spread_passes_deliver_more_of_delta(method, tiny_stats):
    """A strong regulariser leaves most of δ undelivered after one sweep over the layers; each further sweep
    (``spread_passes``) solves for what is still missing, so ``delta_reached`` grows towards 1. The value
    vector is the same in every run (same seed, same model before the spread), and AlphaEdit's updates stay
    in the null space."""
    from workbench.surgery.alphaedit import null_projector

    reg = {"memit": {"mom2_weight": 500.0}, "alphaedit": {"null_threshold": 1e-3, "l2": 2.0}}[method]
    reached, deltas = [], []
    for passes in (1, 2, 4):
        m, tok = fresh()
        res = edit_model(m, tok, [REQ], method=method, hparams=dict(VALUE, layers=[0, 1], spread_passes=passes, **reg),
                         evaluate=False, stats=tiny_stats)
        info = res.info["requests"][0]
        reached.append(info["delta_reached"])
        deltas.append(info["delta"])
        assert [e["pass"] for e in res.info["layers"]] == [p for p in range(passes) for _ in (0, 1)]
        if method == "alphaedit":
            for i in (0, 1):
                d = res.deltas[f"model.layers.{i}.mlp.down_proj.weight"].double()
                p = null_projector(tiny_stats.second_moment(i), reg["null_threshold"])
                assert float((d - d @ p).norm() / d.norm()) < 1e-6
    assert deltas[0] == deltas[1] == deltas[2]
    assert reached[0] < 0.6, reached  # the regulariser holds the first sweep back
    assert reached[0] < reached[1] < reached[2] < 1.05, reached


def test_spread_passes_below_one_refused(tiny_stats):
    """Refused when the hyperparameters are made, and at edit time for a dataclass changed afterwards (no weight
    changed)."""
    for method in ("memit", "alphaedit"):
        for bad in (0, 1.5, True):
            with pytest.raises(HparamsError, match="spread_passes"):
                load_hparams(method, overrides={"spread_passes": bad})
        m, tok = fresh()
        hp = load_hparams(method, m, overrides=dict(VALUE, layers=[0, 1]))
        hp.spread_passes = 0
        snap = snapshot(m)
        with pytest.raises(HparamsError, match="spread_passes"):
            edit_model(m, tok, [REQ], method=method, hparams=hp, evaluate=False, stats=tiny_stats)
        assert_same_weights(m, snap)


def test_alphaedit_editor_protects_earlier_edits(tiny_stats):
    """Sequential AlphaEdit through one Editor: the second update barely moves the first edit's key, because the
    editor accumulated it; a fresh editor (no accumulated keys) on the same once-edited model moves it."""
    hp = dict(VALUE, layers=[1], null_threshold=1e-3, l2=1e-3)
    name = "model.layers.1.mlp.down_proj.weight"
    m, tok = fresh()
    k1 = compute_keys(m, tok, 1, [REQ], [""])[0].double()
    ed = Editor(m, tok, method="alphaedit", hparams=hp, stats=tiny_stats)
    ed.apply([REQ])
    assert ("prev_keys", 1) in ed.state
    guarded = ed.apply([OTHER]).deltas[name].double()
    ed.undo_all()
    m2, _ = fresh()
    Editor(m2, tok, method="alphaedit", hparams=hp, stats=tiny_stats).apply([REQ])
    unguarded = Editor(m2, tok, method="alphaedit", hparams=hp, stats=tiny_stats).apply([OTHER]).deltas[name].double()
    assert float((guarded @ k1).norm()) < 0.1 * float((unguarded @ k1).norm())
    assert float(guarded.norm()) > 0.1 * float(unguarded.norm())  # the second edit still happened


def test_alphaedit_prev_weight_scales_the_guard_on_earlier_edits(tiny_stats):
    """``prev_weight`` (λ_p) weighs the accumulated keys: 0 gives a fresh editor's update exactly (nothing
    accumulated), and a larger weight moves the first edit's key less; the second edit's own key still moves."""
    hp = dict(VALUE, layers=[1], null_threshold=1e-3, l2=1.0)
    name = "model.layers.1.mlp.down_proj.weight"
    m, tok = fresh()
    k1 = compute_keys(m, tok, 1, [REQ], [""])[0].double()
    k2 = compute_keys(m, tok, 1, [OTHER], [""])[0].double()
    Editor(m, tok, method="alphaedit", hparams=hp, stats=tiny_stats).apply([REQ])
    fresh_update = Editor(m, tok, method="alphaedit", hparams=hp, stats=tiny_stats).apply([OTHER]).deltas[name]
    moved, own = {}, {}
    for w in (0.0, 1.0, 100.0):
        m2, _ = fresh()
        ed = Editor(m2, tok, method="alphaedit", hparams=dict(hp, prev_weight=w), stats=tiny_stats)
        ed.apply([REQ])
        d = ed.apply([OTHER]).deltas[name]
        if w == 0.0:
            torch.testing.assert_close(d, fresh_update, rtol=1e-6, atol=1e-9)
        moved[w], own[w] = float((d.double() @ k1).norm()), float((d.double() @ k2).norm())
    assert moved[100.0] < 0.5 * moved[1.0] < 0.5 * moved[0.0], moved
    assert own[100.0] > 0.1 * own[0.0], own


def test_alphaedit_prev_weight_refused_when_negative(tiny_stats):
    for bad in (-1.0, float("nan"), True, "1"):
        with pytest.raises(HparamsError, match="prev_weight"):
            load_hparams("alphaedit", overrides={"prev_weight": bad})
    m, tok = fresh()
    hp = load_hparams("alphaedit", m, overrides=dict(VALUE, layers=[1]))
    hp.prev_weight = -1.0
    snap = snapshot(m)
    with pytest.raises(HparamsError, match="prev_weight"):
        edit_model(m, tok, [REQ], method="alphaedit", hparams=hp, evaluate=False, stats=tiny_stats)
    assert_same_weights(m, snap)


def test_ft_respects_the_norm_constraint(tiny_stats):
    m, tok = fresh()
    res = edit_model(m, tok, [REQ], method="ft", hparams={"layer": 1, "lr": 1e-2, "norm_constraint": 0.02,
                                                          "steps": 30}, evaluate=False)
    (name, d), = res.deltas.items()
    assert name == "model.layers.1.mlp.down_proj.weight"
    assert float(d.abs().max()) <= 0.02 + 1e-6
    assert float(d.abs().max()) > 0.019  # the constraint was active
    assert res.info["nll"] < res.info["nll_start"] - 1.0


# --- undo, context manager, save / load ------------------------------------------------------------------

@pytest.mark.parametrize("method", ["rome", "memit", "alphaedit", "ft"])
def test_undo_is_bit_exact(method, tiny_stats):
    m, tok = fresh()
    snap = snapshot(m)
    hp = {"rome": dict(VALUE, layer=1), "memit": dict(VALUE, layers=[0, 1], mom2_weight=1.0),
          "alphaedit": dict(VALUE, layers=[0, 1], null_threshold=1e-3), "ft": {"layer": 1, "lr": 1e-2}}[method]
    res = edit_model(m, tok, [REQ, OTHER], method=method, hparams=hp, evaluate=False, stats=tiny_stats)
    changed = [n for n, p in m.named_parameters() if not torch.equal(p, snap[n])]
    assert changed and set(changed) == set(res.deltas)
    res.undo()
    assert_same_weights(m, snap)
    res.undo()  # a second undo changes nothing
    assert_same_weights(m, snap)


def test_context_manager_undoes_on_exit_and_on_error(tiny_stats):
    m, tok = fresh()
    snap = snapshot(m)
    before = greedy(m, tok, REQ.text)
    with edit_model(m, tok, [REQ], method="rome", hparams=dict(VALUE, layer=1), evaluate=False,
                    stats=tiny_stats) as res:
        assert greedy(m, tok, REQ.text) != before
        assert res.method == "rome"
    assert_same_weights(m, snap)
    with pytest.raises(KeyError), edit_model(m, tok, [REQ], method="rome", hparams=dict(VALUE, layer=1),
                                             evaluate=False, stats=tiny_stats):
        raise KeyError("inside")
    assert_same_weights(m, snap)


def test_save_load_reapplies_on_a_fresh_model(tmp_path, tiny_stats):
    m, tok = fresh()
    res = edit_model(m, tok, [REQ], method="memit", hparams=dict(VALUE, layers=[0, 1], mom2_weight=1.0),
                     evaluate=False, stats=tiny_stats)
    ids = torch.tensor([prompt_ids(tok, REQ.text)])
    with torch.no_grad():
        edited = m(ids).logits
    res.save(tmp_path / "edit")
    man = json.loads((tmp_path / "edit" / "manifest.json").read_text())
    assert man["method"] == "memit" and man["hparams"]["layers"] == [0, 1]
    assert man["requests"][0]["target_new"] == "Q" and len(man["model_fingerprint"]) == 32
    saved = load_edit(tmp_path / "edit")
    fresh_m, _ = fresh()
    with torch.no_grad():
        plain = fresh_m(ids).logits
    again = saved.apply(fresh_m)
    with torch.no_grad():
        assert torch.equal(fresh_m(ids).logits, edited)
    assert not torch.equal(plain, edited)
    assert greedy(fresh_m, tok, REQ.text) == greedy(m, tok, REQ.text)
    again.undo()
    with torch.no_grad():
        assert torch.equal(fresh_m(ids).logits, plain)
    # refused: a model with other weights (same shapes), and a model of another shape
    other, _ = build_tiny("llama", seed=1)
    with pytest.raises(WorkbenchError, match="fingerprint"):
        saved.apply(other)
    gpt2, _ = fresh("gpt2")
    with pytest.raises(WorkbenchError, match="lacks"):
        saved.apply(gpt2)
    assert_same_weights(other, snapshot(build_tiny("llama", seed=1)[0]))


# --- engine backends see the edit ------------------------------------------------------------------------

def test_both_engine_backends_generate_the_edited_target(tiny_stats):
    from workbench.engine import Engine, GenerationConfig

    m, tok = fresh()
    # the prompt ends in a space, so the target is one token; the edit at layer 0 reaches the last position
    # through layer 1's attention
    req = EditRequest(prompt=REQ.prompt + " ", subject="Eiffel", target_new="Q")
    prompt = prompt_ids(tok, req.text)
    want = target_ids(tok, req.text, req.target_new)
    assert len(want) == 1
    engines = {b: Engine(m, tok, backend=b, threads=None) for b in ("hf", "packed-llama")}
    cfg = GenerationConfig(max_new_tokens=len(want))
    before = {b: e.generate([prompt], cfg)[0].token_ids for b, e in engines.items()}  # packs the old weights
    assert before["hf"] != want
    res = edit_model(m, tok, [req], method="rome", hparams=dict(VALUE, layer=0), evaluate=False, stats=tiny_stats)
    for b, e in engines.items():
        assert e.generate([prompt], cfg)[0].token_ids == want, b
    res.undo()
    for b, e in engines.items():
        assert e.generate([prompt], cfg)[0].token_ids == before[b], b


def test_evaluate_measures_before_and_after(tiny_stats):
    """evaluate=True: workbench.surgery.metrics before and after; post-edit locality against the pre-edit model."""
    pytest.importorskip("workbench.surgery.metrics")
    m, tok = fresh()
    req = EditRequest(prompt=REQ.prompt + " ", subject="Eiffel", target_new="Q", locality=[("Hello wor", "ld")])
    res = edit_model(m, tok, [req], method="rome", hparams=dict(VALUE, layer=0), stats=tiny_stats)
    pre, post = res.metrics["pre"], res.metrics["post"]
    assert pre["greedy"]["rewrite_greedy"] == 0.0 and post["greedy"]["rewrite_greedy"] == 1.0
    assert not pre["has_reference"] and post["has_reference"]
    assert post["easyedit"]["locality"] is not None


# --- statistics ------------------------------------------------------------------------------------------

class _Counter:
    def __init__(self, model, layer):
        self.n = 0
        blocks = model.model.layers
        self.h = blocks[layer].register_forward_pre_hook(lambda *a: setattr(self, "n", self.n + 1))

    def close(self):
        self.h.remove()


def test_stats_run_only_up_to_the_layer_and_are_cached(tmp_path):
    m, tok = fresh()
    above, at = _Counter(m, 1), _Counter(m, 0)
    try:
        st = compute_stats(m, tok, [0], cache_dir=tmp_path, **STATS)
        assert at.n == 4096 // 128 // 8 and above.n == 0  # block 1 never ran; block 0 only up to its key
        assert st.count == 4096 and st.sums[0].shape == (128, 128) and st.sums[0].dtype == torch.float64
        keys = _corpus_keys(m, tok, 0, n_windows=32)
        torch.testing.assert_close(st.sums[0], keys.T @ keys, rtol=1e-5, atol=1e-3)
        at.n = 0
        again = compute_stats(m, tok, [0], cache_dir=tmp_path, **STATS)
        assert at.n == 0 and torch.equal(again.sums[0], st.sums[0])  # read from disk, no forward
        # other weights: another cache entry
        with torch.no_grad():
            m.model.layers[0].mlp.up_proj.weight.mul_(1.01)
        compute_stats(m, tok, [0], cache_dir=tmp_path, **STATS)
        assert at.n == 4
    finally:
        above.close()
        at.close()


def test_keys_stop_the_forward_at_the_layer_and_equal_a_full_forward():
    from workbench.interp.hooks import Hooks
    from workbench.surgery.compute import mlp_keys, subject_end, subject_index

    m, tok = fresh()
    texts = [REQ.text, "a much longer text about " + OTHER.text]
    full = {}
    with Hooks(m, [(f"blocks.{i}.mlp.hook_post", lambda a, h: full.__setitem__(h.layer, a.float()))
                   for i in (0, 1)]):
        ids = [prompt_ids(tok, t) for t in texts]
        for row, seq in enumerate(ids):  # each text alone: no padding at all
            m(input_ids=torch.tensor([seq]))
            full[(row, 0)], full[(row, 1)] = full[0][0], full[1][0]
    calls = []
    above, head = _Counter(m, 1), m.lm_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        got, mask = mlp_keys(m, tok, [0], texts)
        assert above.n == 0 and not calls  # block 1 and the LM head never ran
        for row, seq in enumerate(ids):
            assert mask[row].sum() == len(seq)
            torch.testing.assert_close(got[0][row, : len(seq)], full[(row, 0)], rtol=0, atol=1e-5)
        k = compute_keys(m, tok, 0, [REQ], [""])[0]
        assert above.n == 0 and not calls
        torch.testing.assert_close(k, full[(0, 0)][subject_index(tok, REQ.text, subject_end(REQ, ""))],
                                   rtol=0, atol=1e-5)
        got, _ = mlp_keys(m, tok, [0, 1], texts)  # both layers, the head still skipped
        assert above.n == 1 and not calls and set(got) == {0, 1}
        torch.testing.assert_close(got[1][1, : len(ids[1])], full[(1, 1)], rtol=0, atol=1e-5)
    finally:
        above.close()
        head.remove()


def test_stats_resume_after_an_interruption(tmp_path):
    from workbench.interp import Hooks

    m, tok = fresh()
    ref = compute_stats(m, tok, [0, 1], cache=False, **STATS)
    calls = []

    def die(act, hook):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), Hooks(m, [("blocks.0.hook_resid_pre", die)]):
        compute_stats(m, tok, [0, 1], cache_dir=tmp_path, checkpoint_every=1, **STATS)
    assert list((tmp_path / "partial").iterdir())  # partial sums of the two finished batches
    counter = _Counter(m, 0)
    try:
        st = compute_stats(m, tok, [0, 1], cache_dir=tmp_path, checkpoint_every=1, **STATS)
    finally:
        counter.close()
    assert counter.n == 4 - 2  # only the missing batches ran
    for i in (0, 1):
        assert torch.equal(st.sums[i], ref.sums[i])
    assert not list((tmp_path / "partial").iterdir())


def test_stats_two_processes_over_gloo_equal_one_process(tmp_path):
    import surgery_stats_worker as W
    from conftest import REPO

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(REPO / "tests" / "surgery_stats_worker.py"), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    ddp = torch.load(tmp_path / "ddp.pt")
    one = W.stats(tmp_path / "one")
    assert ddp["count"] == one.count == W.TOKENS
    for i in W.LAYERS:
        # other batches (each rank's windows are every other window): the per-batch fp32 Gram matrices round
        # differently. Measured max difference 4e-4 on entries up to ~1e3 (4e-7 of the scale); 1e-6 of it allowed
        scale = float(one.sums[i].abs().max())
        torch.testing.assert_close(ddp["sums"][i], one.sums[i], rtol=0, atol=1e-6 * scale)
        assert float(one.sums[i].abs().max()) > 1.0


# --- command line ----------------------------------------------------------------------------------------

def _edit_args(argv):
    import argparse

    from workbench.surgery import cli

    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["edit", *argv])


def test_cli_refuses_bad_input_before_loading(tmp_path, monkeypatch):
    import workbench
    from workbench.surgery import cli

    monkeypatch.setattr(workbench, "load", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(BadRequestError, match="--subject"):
        cli.run(_edit_args(["--prompt", "The Eiffel Tower is in", "--target-new", "Rome"]))
    bad = tmp_path / "r.jsonl"
    bad.write_text('{"prompt": "a", "target_new": "b", "subject": "a"}\n{not json}\n')
    with pytest.raises(BadRequestError, match=r"r\.jsonl:2"):
        cli.run(_edit_args(["--requests", str(bad)]))
    with pytest.raises(BadRequestError, match="not both"):
        cli.run(_edit_args(["--requests", str(bad), "--prompt", "x"]))
    with pytest.raises(ValueError, match="--out"):
        cli.run(_edit_args(["--prompt", "A is", "--subject", "A", "--target-new", "B", "--gguf", "f16"]))


def test_cli_edits_a_tiny_model_and_saves_the_deltas(tmp_path, capsys):
    from workbench.surgery import cli

    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps({"layer": 1, "lr": 1e-2}))
    args = _edit_args(["-m", "tiny-llama", "--method", "ft", "--prompt", REQ.prompt, "--subject", "Eiffel",
                       "--target-new", "Q", "--hparams", str(hp), "--json"])
    args.out = None
    assert cli.run(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "ft" and out["changed"] == ["model.layers.1.mlp.down_proj.weight"]
    assert out["info"]["nll"] < out["info"]["nll_start"]


# --- the real model --------------------------------------------------------------------------------------

@pytest.mark.realmodel
@pytest.mark.slow
def test_real_edit_eiffel_tower_to_rome(smollm2):
    model, tok = smollm2
    req = EditRequest(prompt="The Eiffel Tower is located in the city of", subject="Eiffel Tower",
                      target_new="Rome", rephrase_prompts=["The Eiffel Tower, a famous landmark, is in the city of"])
    unrelated = "The capital of Germany is"
    snap = snapshot(model)
    rome_ids = target_ids(tok, req.text, "Rome")
    assert greedy(model, tok, req.text, 1) != rome_ids[:1]
    berlin = greedy(model, tok, unrelated, 2)
    layer = load_hparams("rome", model).layer  # the SmolLM2 defaults file's layer
    res = edit_model(model, tok, [req], method="rome", evaluate=False,
                     stats=compute_stats(model, tok, [layer], tokens=20_000, progress=False))
    try:
        assert greedy(model, tok, req.text, 1) == rome_ids[:1]
        assert greedy(model, tok, req.rephrase_prompts[0], 1) == rome_ids[:1]
        assert greedy(model, tok, unrelated, 2) == berlin
    finally:
        res.undo()
    assert_same_weights(model, snap)


def test_run_sequential_measures_each_batch_records_hparams_and_undoes(tiny_stats):
    from workbench.surgery.sequential import run_sequential

    m, tok = fresh()
    snap = snapshot(m)
    hp = dict(VALUE, layers=[0, 1], null_threshold=1e-3, l2=2.0, spread_passes=2)
    res = run_sequential(m, tok, [REQ, OTHER], "alphaedit", batch_size=1, eval_every=1, hparams=hp, stats=tiny_stats)
    assert [p["n_edits"] for p in res.points] == [0, 1, 2]
    assert len(res.points[1]["held"]) == 1 and len(res.points[2]["held"]) == 2
    d = res.to_dict()
    assert d["hparams"]["l2"] == 2.0 and d["hparams"]["spread_passes"] == 2 and d["hparams"]["layers"] == [0, 1]
    assert res.undone_exact is True
    assert_same_weights(m, snap)
