"""Hook points, activation cache, logit lens, patching and the TransformerLens bridge."""

import gc
import warnings

import pytest
import torch

from workbench.interp import (
    Hooks,
    activation_patching,
    attribution_patching,
    count_hooks,
    hook_names,
    logit_diff,
    logit_lens,
    run_with_cache,
    run_with_hooks,
    to_transformer_lens,
    unembed,
)
from workbench.models.tiny import build_tiny

ARCHS = ["llama", "gpt2", "gemma3"]


def _tiny(arch):
    if arch != "gemma3":
        return build_tiny(arch)
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    from workbench.models.tiny import byte_tokenizer

    tok = byte_tokenizer()
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                           sliding_window=8, initializer_range=0.1, pad_token_id=tok.pad_token_id,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return model.eval(), tok


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request):
    model, tok = _tiny(request.param)
    return model.eval(), tok


def _ids(tok, text="The quick brown fox jumps over the lazy dog"):
    return tok([text], return_tensors="pt").input_ids


def test_names_cover_every_layer(tiny):
    model, _ = tiny
    names = hook_names(model)
    n = model.config.num_hidden_layers
    assert names[0] == "hook_embed" and names[-1] == "ln_final.hook_normalized"
    assert sum(x.endswith("hook_resid_post") for x in names) == n
    assert len(set(names)) == len(names)


def test_logits_unchanged_and_all_points_cached(tiny):
    model, tok = tiny
    ids = _ids(tok)
    with torch.no_grad():
        ref = model(ids).logits
    out, cache = run_with_cache(model, ids)
    assert torch.allclose(out.logits, ref, atol=1e-4)
    assert set(cache) == set(hook_names(model))
    b, s = ids.shape
    cfg = model.config
    assert cache["blocks.0.hook_resid_pre"].shape == (b, s, cfg.hidden_size)
    assert cache["blocks.1.attn.hook_pattern"].shape == (b, cfg.num_attention_heads, s, s)
    assert cache["blocks.1.attn.hook_z"].shape[2] == cfg.num_attention_heads
    # resid_mid / resid_post are consistent with what each block adds
    for i in range(cfg.num_hidden_layers):
        pre, mid, post = (cache[f"blocks.{i}.{k}"] for k in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post"))
        assert torch.allclose(mid, pre + cache[f"blocks.{i}.hook_attn_out"], atol=1e-5)
        assert torch.allclose(post, mid + cache[f"blocks.{i}.hook_mlp_out"], atol=1e-5)
    assert count_hooks(model) == 0 and model.config._attn_implementation == "sdpa"


def test_pattern_is_causal_distribution(tiny):
    model, tok = tiny
    _, cache = run_with_cache(model, _ids(tok), names="blocks.0.attn.hook_pattern")
    p = cache["blocks.0.attn.hook_pattern"]
    assert torch.allclose(p.sum(-1), torch.ones(p.shape[:-1]), atol=1e-5)
    assert p.triu(1).abs().max() == 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cache_equals_transformer_lens(arch):
    model, tok = build_tiny(arch)
    model.eval()
    ids = _ids(tok)
    before = [type(m) for m in model.modules()]
    bridge = to_transformer_lens(model, tok)
    assert [type(m) for m in model.modules()] == before  # the user's model is not rewritten
    _, ours = run_with_cache(model, ids)
    with torch.no_grad():
        tl_logits, theirs = bridge.run_with_cache(ids)
    assert torch.allclose(tl_logits, model(ids).logits, atol=1e-4)
    common = [n for n in ours if n in theirs]
    assert len(common) == len(ours)  # every name of ours exists in TransformerLens
    for n in common:
        assert torch.allclose(ours[n], theirs[n], atol=1e-4), n


def test_replacement_equivalences(tiny):
    model, tok = tiny
    ids = _ids(tok)
    d = model.config.hidden_size
    delta = torch.randn(d, generator=torch.Generator().manual_seed(0))

    def add(act, _hook):
        return act + delta

    def logits(hooks):
        with torch.no_grad():
            return run_with_hooks(model, ids, fwd_hooks=hooks).logits

    base = logits([])
    a = logits([("blocks.0.hook_resid_post", add)])
    assert not torch.allclose(a, base, atol=1e-3)
    assert torch.allclose(a, logits([("blocks.1.hook_resid_pre", add)]), atol=1e-5)
    assert torch.allclose(logits([("blocks.1.hook_resid_mid", add)]), logits([("blocks.1.hook_attn_out", add)]), atol=1e-5)
    if model.config.model_type == "llama":  # no output biases: zeroing z == zeroing attn_out
        zero = lambda act, _h: torch.zeros_like(act)  # noqa: E731
        assert torch.allclose(logits([("blocks.0.attn.hook_z", zero)]), logits([("blocks.0.hook_attn_out", zero)]), atol=1e-5)
        assert torch.allclose(logits([("blocks.1.mlp.hook_post", zero)]), logits([("blocks.1.hook_mlp_out", zero)]), atol=1e-5)


def test_filters_and_errors(tiny):
    model, tok = tiny
    ids = _ids(tok)
    _, cache = run_with_cache(model, ids, names=lambda n: n.endswith("hook_resid_post"))
    assert len(cache) == model.config.num_hidden_layers
    assert cache.stack("hook_resid_post").shape[0] == model.config.num_hidden_layers
    with pytest.raises(KeyError, match="did you mean"):
        run_with_cache(model, ids, names=["blocks.0.hook_resid_psot"])
    with pytest.raises(KeyError, match="not in this cache"):
        cache["blocks.0.hook_resid_pre"]
    with pytest.raises(ValueError, match="read-only"):
        run_with_hooks(model, ids, fwd_hooks=[("blocks.0.attn.hook_pattern", lambda a, h: a * 2)])
    with pytest.raises(ValueError, match="shape"):
        run_with_hooks(model, ids, fwd_hooks=[("blocks.0.hook_resid_pre", lambda a, h: a[:, :1])])
    assert count_hooks(model) == 0 and model.config._attn_implementation == "sdpa"


def test_unknown_architecture():
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=8))
    with pytest.raises(NotImplementedError, match="model_type 'bert'"):
        hook_names(model)


def test_hooks_removed_after_exceptions(tiny):
    model, tok = tiny
    ids = _ids(tok)

    def boom(act, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_with_cache(model, ids, fwd_hooks=[("blocks.1.hook_mlp_out", boom)])
    assert count_hooks(model) == 0 and model.config._attn_implementation == "sdpa"
    with pytest.raises(ZeroDivisionError), Hooks(model, [("blocks.0.attn.hook_pattern", lambda a, h: None)]):
        assert count_hooks(model) > 0 and model.config._attn_implementation == "eager"
        1 / 0  # noqa: B018
    assert count_hooks(model) == 0 and model.config._attn_implementation == "sdpa"


def test_no_memory_growth_over_cached_runs(tiny):
    model, tok = tiny
    ids = _ids(tok)

    def live_tensors():
        gc.collect()
        with warnings.catch_warnings():  # isinstance() on some torch module objects warns
            warnings.simplefilter("ignore")
            return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    for _ in range(3):
        run_with_cache(model, ids)
    start = live_tensors()
    for _ in range(30):
        out, cache = run_with_cache(model, ids)
        del out, cache
    assert live_tensors() <= start + 2
    assert count_hooks(model) == 0


def test_logit_lens_last_layer_is_the_model(tiny):
    model, tok = tiny
    ids = _ids(tok)
    res = logit_lens(model, ids, positions=None)
    with torch.no_grad():
        ref = model(ids).logits
        _, cache = run_with_cache(model, ids, names=["blocks.0.hook_resid_pre"])
        first = unembed(model, cache["blocks.0.hook_resid_pre"])
    assert res.logits.shape[0] == model.config.num_hidden_layers + 1
    assert torch.allclose(res.logits[-1], ref, atol=1e-4)
    assert torch.allclose(res.logits[0], first, atol=1e-5)
    top = res.top_tokens(tok, k=3)
    assert len(top) == len(res.names) and len(top[0]) == 3
    ranks = res.rank_of(int(ref[0, -1].argmax()))
    assert ranks[-1, 0, -1] == 0


def _pair(tok):
    clean = _ids(tok, "When Mary and John went to the store, John gave a drink to")
    corrupt = _ids(tok, "When Mary and John went to the store, Mary gave a drink to")
    assert clean.shape == corrupt.shape
    return clean, corrupt


def test_activation_patching_exact_cells(tmp_path):
    model, tok = build_tiny("llama")
    model.eval()
    clean, corrupt = _pair(tok)
    diff_pos = int((clean != corrupt).nonzero()[0, 1])
    metric = logit_diff(int(tok.convert_tokens_to_ids("M")), int(tok.convert_tokens_to_ids("J")))
    res = activation_patching(model, clean, corrupt, metric, kind="hook_resid_pre", tokenizer=tok, batch_size=7)
    n = model.config.num_hidden_layers
    assert res.scores.shape == (n, clean.shape[1])
    # before the differing token activations are identical: nothing to recover
    assert res.scores[:, :diff_pos].abs().max() < 1e-4
    # the last position of the final residual stream determines the metric: patching it recovers everything
    post = activation_patching(model, clean, corrupt, metric, kind="hook_resid_post", layers=[n - 1])
    assert post.scores[0, -1] == pytest.approx(1.0, abs=1e-4)
    # a batched cell equals patching that single cell alone
    _, cc = run_with_cache(model, clean, names=["blocks.1.hook_resid_pre"])
    src = cc["blocks.1.hook_resid_pre"]

    def one(act, _h):
        act = act.clone()
        act[:, diff_pos] = src[:, diff_pos]
        return act

    with torch.no_grad():
        single = metric(run_with_hooks(model, corrupt, fwd_hooks=[("blocks.1.hook_resid_pre", one)]).logits)
    assert res.raw[1, diff_pos] == pytest.approx(float(single), abs=1e-4)
    png = res.plot(tmp_path / "patch.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="same length"):
        activation_patching(model, clean, corrupt[:, :-1], metric)
    with pytest.raises(ValueError, match="kind"):
        activation_patching(model, clean, corrupt, metric, kind="attn.hook_pattern")


@pytest.mark.parametrize("kind", ["hook_resid_pre", "hook_attn_out", "attn.hook_z", "mlp.hook_post"])
def test_attribution_patching_is_the_first_order_term(kind, monkeypatch):
    """Every cell's attribution (one backward pass through the hooks) against an independent reference: the
    central finite difference of the metric along that cell's (clean - corrupted) activation difference,
    forward passes only. Cells must be non-trivial (not all zero), so a zero gradient cannot pass."""
    from transformers.models.llama import modeling_llama

    def rms_norm_in_input_dtype(self, h):
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    # HF's RMSNorm normalises in float32 even in a float64 model: ~1e-7 rounding noise in every forward, which a
    # central difference divides by eps (1e-4 error at eps=1e-3). The same norm in float64 makes the reference
    # exact to O(eps^2); attribution and reference both run on this same model.
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rms_norm_in_input_dtype)
    model, tok = build_tiny("llama")
    model = model.double().eval()
    clean, corrupt = _pair(tok)
    metric = logit_diff(int(tok.convert_tokens_to_ids("M")), int(tok.convert_tokens_to_ids("J")))
    attr = attribution_patching(model, clean, corrupt, metric, kind=kind)
    n, T = model.config.num_hidden_layers, clean.shape[1]
    diff_pos = int((clean != corrupt).nonzero()[0, 1])
    eps = 1e-4  # central difference: O(eps^2) error, ~1e-9 here
    rows = torch.arange(T)
    fd = torch.zeros(n, T, dtype=torch.float64)
    for layer in range(n):
        name = f"blocks.{layer}.{kind}"
        _, cc = run_with_cache(model, clean, names=[name])
        _, kc = run_with_cache(model, corrupt, names=[name])
        delta = (cc[name] - kc[name])[0]

        def nudged(e, name=name, delta=delta):
            def nudge(act, _h):  # batch row j nudges position j only
                act = act.clone()
                act[rows, rows] += e * delta
                return act
            with torch.no_grad():
                return metric(run_with_hooks(model, corrupt.expand(T, -1), fwd_hooks=[(name, nudge)]).logits)

        fd[layer] = (nudged(eps) - nudged(-eps)) / (2 * eps)
    scale = float(fd.abs().max())
    assert scale > 1e-2, scale  # the corrupted token moves the metric: the reference itself is not vacuous
    assert int((fd.abs() > 1e-3 * scale).sum()) >= n * (T - diff_pos) // 2  # many cells carry a signal
    assert fd[:, :diff_pos].abs().max() == 0 and attr.raw[:, :diff_pos].abs().max() == 0  # identical prefix
    # measured: max abs error 3.5e-9, max relative 7.7e-8 (raw is cast to float32: 2^-24 = 6e-8 per value);
    # rtol 1e-6 and atol 1e-8 leave ~3x-10x of that, four orders below the cell values
    torch.testing.assert_close(attr.raw.double(), fd, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(attr.scores * (attr.clean_metric - attr.corrupted_metric), attr.raw)
    assert not torch.is_grad_enabled() or all(p.grad is None for p in model.parameters())


@pytest.mark.realmodel
def test_smollm2_hooks_match_transformer_lens_and_hf(smollm2):
    model, tok = smollm2
    ids = tok("The Eiffel Tower is in the city of", return_tensors="pt").input_ids
    names = [f"blocks.{i}.{k}" for i in (0, 15, 29) for k in
             ("hook_resid_pre", "hook_resid_mid", "hook_attn_out", "mlp.hook_post", "attn.hook_z", "hook_resid_post")]
    with torch.no_grad():
        ref = model(ids).logits
    out, ours = run_with_cache(model, ids, names=names + ["blocks.15.attn.hook_pattern"])
    assert torch.allclose(out.logits, ref, atol=1e-4)
    bridge = to_transformer_lens(model, tok)
    with torch.no_grad():
        _, theirs = bridge.run_with_cache(ids)
    for n in ours:
        assert torch.allclose(ours[n], theirs[n], atol=1e-4), n
    del bridge
    lens = logit_lens(model, ids)
    paris = tok(" Paris", add_special_tokens=False).input_ids[0]
    assert int(lens.rank_of(paris)[-1, 0, 0]) == 0  # the model's answer, read at the last layer
    assert count_hooks(model) == 0 and model.config._attn_implementation == "sdpa"
