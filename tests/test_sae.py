"""Sparse autoencoders: architectures, training, SAELens files both ways, metrics, store, dashboards."""

import itertools
import json
from html.parser import HTMLParser

import pytest
import torch
from corpora import require

from workbench.interp import run_with_cache
from workbench.models.tiny import build_tiny
from workbench.sae import (
    ARCHITECTURES,
    ActivationStore,
    SAEConfig,
    SparseAutoencoder,
    StoreConfig,
    TrainConfig,
    evaluate_sae,
    feature_reports,
    load_sae,
    render_dashboard,
    save_sae,
    train_sae,
)
from workbench.sae.model import _JumpReLU, _Step

HOOK = "blocks.1.hook_resid_pre"


def synthetic(n_batches=400, batch=256, d=32, n_feat=128, active=4, seed=0):
    """Sparse combinations of a hidden unit-norm dictionary: the data SAEs are meant to recover."""
    dictionary = torch.randn(n_feat, d, generator=torch.Generator().manual_seed(1234))  # fixed across seeds
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        idx = torch.rand(batch, n_feat, generator=g).argsort(1)[:, :active]
        coef = torch.zeros(batch, n_feat).scatter(1, idx, torch.rand(batch, active, generator=g) * 2 + 0.5)
        yield coef @ dictionary


SETTINGS = {  # architecture -> (config overrides, max L0 on fresh data); the data are exactly 4-sparse
    "relu": ({"l1_coefficient": 1.0}, 12),
    "topk": ({"k": 4}, 4),
    "batchtopk": ({"k": 4}, 8),
    "jumprelu": ({"l0_coefficient": 0.2, "jumprelu_init_threshold": 0.5, "jumprelu_bandwidth": 0.2}, 8),
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_architecture_learns_sparse_codes(arch):
    overrides, max_l0 = SETTINGS[arch]
    sae = SparseAutoencoder(SAEConfig(32, 256, arch, **overrides))
    res = train_sae(sae, synthetic(), TrainConfig(total_tokens=400 * 256, lr=1e-2, progress=False, log_every=20,
                                                  dead_after_tokens=20_000))
    first, last = res.history[0], res.history[-1]
    assert last["fvu"] < 0.5 * first["fvu"], (first, last)
    x = next(synthetic(1, seed=1))
    with torch.no_grad():
        f = sae.encode(x)
        fvu = float((x - sae.decode(f)).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    l0 = float((f > 0).sum(-1).float().mean())
    assert fvu < 0.3 and 1 < l0 <= max_l0, (fvu, l0)  # faithful and sparse on fresh data
    if arch == "topk":
        assert ((f > 0).sum(-1) <= 4).all()
    if arch == "batchtopk":
        assert bool(sae.threshold_initialised) and float(sae.threshold.min()) > 0


def test_relu_l1_trades_sparsity():
    l0 = {}
    for coef in (0.0, 1.0):
        sae = SparseAutoencoder(SAEConfig(32, 128, "relu", l1_coefficient=coef))
        train_sae(sae, synthetic(150), TrainConfig(total_tokens=150 * 256, lr=1e-2, progress=False))
        with torch.no_grad():
            l0[coef] = float((sae.encode(next(synthetic(1, seed=2))) > 0).sum(-1).float().mean())
    assert l0[1.0] < 0.5 * l0[0.0]


def test_jumprelu_straight_through_gradients():
    pre = torch.tensor([[0.30, 0.52, 0.49, 0.9]], requires_grad=True)
    thr = torch.tensor([0.5, 0.5, 0.5, 0.5], requires_grad=True)
    eps = 0.1
    out = _JumpReLU.apply(pre, thr, eps)
    assert torch.equal(out.detach(), torch.tensor([[0.0, 0.52, 0.0, 0.9]]))
    out.sum().backward()
    assert torch.equal(pre.grad, torch.tensor([[0.0, 1.0, 0.0, 1.0]]))
    # d/dtheta = -(theta/eps) * 1[|pre - theta| < eps/2]  (Rajamanoharan et al. 2024, eq. 11)
    assert torch.allclose(thr.grad, torch.tensor([0.0, -5.0, -5.0, 0.0]))
    thr.grad = None
    _Step.apply(pre, thr, eps).sum().backward()
    assert torch.allclose(thr.grad, torch.tensor([0.0, -10.0, -10.0, 0.0]))


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sparse_training_path_matches_dense_autograd(arch):
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(16, 64, arch, k=3, aux_k=5), seed=1)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.3)
        sae.b_enc.normal_(0, 0.3)
    x = torch.randn(24, 16)
    dead = torch.rand(64) < 0.5
    out = sae.training_forward(x, dead)
    out.loss.backward()
    sparse_grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    # dense reference: same selection, plain autograd through full matrices
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    if arch == "topk":
        idx = pre.detach().topk(3, dim=-1).indices
        mask = torch.zeros_like(pre, dtype=torch.bool).scatter(-1, idx, True)
    else:
        flat = pre.detach().relu().flatten()
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[flat.topk(3 * 24).indices] = True
        mask = mask.view_as(pre)
    acts = pre.relu() * mask
    recon = acts @ sae.W_dec + sae.b_dec
    err = x - recon
    aux_idx = pre.detach().masked_fill(~dead, float("-inf")).topk(5, dim=-1).indices
    aux_acts = (pre.relu() * torch.zeros_like(pre, dtype=torch.bool).scatter(-1, aux_idx, True))
    e = err.detach()
    aux = min(1.0, int(dead.sum()) / 5) * (aux_acts @ sae.W_dec - e).pow(2).sum(-1).mean() / 32
    loss = err.pow(2).sum(-1).mean() + aux
    assert float(loss) == pytest.approx(float(out.loss), rel=1e-5)
    loss.backward()
    for n, p in sae.named_parameters():
        assert torch.allclose(sparse_grads[n], p.grad, atol=1e-5), n
    assert float(out.l0) == pytest.approx(float((acts > 0).sum(-1).float().mean()))
    assert torch.equal(out.fired, (acts > 0).any(0))


def test_auxk_reaches_dead_latents():
    sae = SparseAutoencoder(SAEConfig(16, 64, "topk", k=2, aux_k=8))
    x = torch.randn(32, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[40:] = True
    out = sae.training_forward(x, dead)
    assert out.aux > 0
    out.loss.backward()
    live_only = sae.training_forward(x, None)
    assert live_only.aux == 0
    assert sae.W_enc.grad[:, 40:].abs().sum() > 0  # the dead latents are trained through AuxK


def _silenced_topk():
    """A top-k SAE (128 latents for the 128 hidden features) whose last 32 latents can never be picked:
    pre-activations ~ -100, so AuxK's ReLU passes them no gradient either."""
    sae = SparseAutoencoder(SAEConfig(32, 128, "topk", k=4, aux_k=16), seed=0)
    with torch.no_grad():
        sae.b_enc[96:] = -100.0
    return sae


def test_resampling_revives_silenced_latents():
    cfg = dict(total_tokens=200 * 256, lr=1e-2, progress=False, log_every=10, dead_after_tokens=5_000,
               aux_after_tokens=2_000)
    plain = _silenced_topk()
    base = train_sae(plain, synthetic(200), TrainConfig(**cfg))
    assert base.resampled == 0 and base.dead_fraction >= 32 / 128  # AuxK alone cannot reach them
    sae = _silenced_topk()
    res = train_sae(sae, synthetic(200), TrainConfig(**cfg, resample_every_tokens=5_000))
    assert res.resampled >= 32
    assert res.dead_fraction < 0.03, res.dead_fraction
    with torch.no_grad():
        f = sae.encode(next(synthetic(4, seed=3)))
    assert int((f[:, 96:] > 0).any(0).sum()) >= 28  # the revived latents fire on fresh data
    assert res.history[-1]["fvu"] < base.history[-1]["fvu"]  # and they help the reconstruction
    decay_start = int(200 * (1 - 0.2))  # no resampling once the lr decay has started
    late = [r["resampled"] for r in res.history if r["step"] >= decay_start]
    assert len(set(late)) == 1


def test_resample_when_every_latent_is_silent_scales_by_all_latents():
    from workbench.sae.train import _resample

    sae = SparseAutoencoder(SAEConfig(8, 6, "relu"), seed=0)  # relu: decoder rows are not unit norm
    with torch.no_grad():
        sae.W_dec.mul_(torch.arange(1, 7, dtype=torch.float32)[:, None])
    dec_norm, enc_norm = sae.W_dec.norm(dim=1).mean(), sae.W_enc.norm(dim=0).mean()
    x = torch.randn(6, 8)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    assert _resample(sae, opt, torch.ones(6, dtype=torch.bool), x, torch.zeros_like(x)) == 6
    torch.testing.assert_close(sae.W_dec.norm(dim=1), dec_norm.expand(6))
    torch.testing.assert_close(sae.W_enc.norm(dim=0), enc_norm.expand(6))


def test_resample_points_latents_at_badly_reconstructed_inputs():
    from workbench.sae.train import _resample

    sae = SparseAutoencoder(SAEConfig(8, 16, "topk", k=2), seed=0)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    x = torch.randn(4, 8)
    sae.training_forward(x).loss.backward()
    opt.step()
    recon = x.clone()
    recon[2] = 0.0  # only input 2 is reconstructed badly: every pick lands there
    silent = torch.zeros(16, dtype=torch.bool)
    silent[[3, 9]] = True
    before = {id(p): {m: t.clone() for m, t in opt.state[p].items()} for p in (sae.W_enc, sae.W_dec, sae.b_enc)}
    assert _resample(sae, opt, silent, x, recon) == 1  # one input with error: one latent re-initialised
    d = x[2] / x[2].norm()
    assert torch.allclose(sae.W_dec[3], d * sae.W_dec[~silent].norm(dim=1).mean(), atol=1e-6)
    assert torch.allclose(sae.W_enc[:, 3] / sae.W_enc[:, 3].norm(), d, atol=1e-6) and float(sae.b_enc[3]) == 0
    for p, row in ((sae.W_dec, (3,)), (sae.b_enc, (3,)), (sae.W_enc, (slice(None), 3))):
        for m in ("exp_avg", "exp_avg_sq"):
            expect = before[id(p)][m].clone()
            expect[row] = 0.0  # the re-initialised latent's moments are zeroed, the others kept
            assert torch.equal(opt.state[p][m], expect)
    with pytest.raises(ValueError, match="resample_every_tokens"):
        TrainConfig(resample_every_tokens=0)


def test_auxk_term_is_in_reconstruction_units():
    # AuxK is weighted against the MSE in the same units (Gao et al.; EleutherAI's sparsify): scaling the input by
    # c scales both by c^2. An AuxK normalised by the error's own energy would not move, and on real activations
    # (error ~ 10% of the variance) ended up too weak to revive any latent.
    sae = SparseAutoencoder(SAEConfig(16, 64, "topk", k=2, aux_k=8), seed=2)
    with torch.no_grad():
        sae.b_dec.normal_()
    x = torch.randn(32, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[40:] = True
    a = sae.training_forward(x, dead)
    with torch.no_grad():
        sae.b_dec.mul_(3.0)
    b = sae.training_forward(3.0 * x, dead)
    assert float(b.mse / a.mse) == pytest.approx(9.0, rel=1e-4)
    assert float(b.aux / a.aux) == pytest.approx(9.0, rel=1e-4)
    few = torch.zeros(64, dtype=torch.bool)
    few[60:] = True  # 4 dead latents < aux_k = 8: the term is scaled by 4 / 8
    c, full = sae.training_forward(3.0 * x, few), SparseAutoencoder(SAEConfig(16, 64, "topk", k=2, aux_k=4), seed=2)
    with torch.no_grad():
        full.load_state_dict(sae.state_dict())
    assert float(c.aux) == pytest.approx(0.5 * float(full.training_forward(3.0 * x, few).aux), rel=1e-5)


def test_fold_scale_keeps_latents():
    sae = SparseAutoencoder(SAEConfig(16, 64, "topk", k=4))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    x, s = torch.randn(8, 16), 3.7
    f_scaled, r_scaled = sae.encode(s * x), sae(s * x)
    sae.fold_scale(s)
    assert torch.allclose(sae.encode(x), f_scaled, atol=1e-5)
    assert torch.allclose(sae(x), r_scaled / s, atol=1e-5)


def _random_sae(arch):
    sae = SparseAutoencoder(SAEConfig(16, 48, arch, k=5, hook_name=HOOK, model_name="tiny-llama"), seed=3)
    with torch.no_grad():
        for p in (sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec):
            p.normal_(0, 0.5)
        if arch == "jumprelu":
            sae.log_threshold.uniform_(-3, 0)
        if arch == "batchtopk":
            sae.threshold.uniform_(0, 0.5)
    return sae


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_saelens_loads_ours(arch, tmp_path):
    from sae_lens import SAE

    ours = _random_sae(arch)
    save_sae(ours, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == HOOK
    theirs = SAE.load_from_disk(str(tmp_path))
    x = torch.randn(64, 16)
    with torch.no_grad():
        assert torch.allclose(theirs.encode(x), ours.encode(x), atol=1e-5)
        assert torch.allclose(theirs(x), ours(x), atol=1e-5)
    back = load_sae(tmp_path)
    assert torch.allclose(back(x), ours(x), atol=1e-5)


@pytest.mark.parametrize("which", ["standard", "topk", "jumprelu"])
def test_we_load_saelens(which, tmp_path):
    import sae_lens

    cfg_cls = {"standard": sae_lens.StandardSAEConfig, "topk": sae_lens.TopKSAEConfig,
               "jumprelu": sae_lens.JumpReLUSAEConfig}[which]
    extra = {"k": 6} if which == "topk" else {}
    theirs = sae_lens.SAE.from_dict(cfg_cls(d_in=16, d_sae=40, **extra).to_dict())
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.copy_(torch.rand_like(p) * 0.3 if name == "threshold" else torch.randn_like(p) * 0.5)
    theirs.save_model(str(tmp_path))
    ours = load_sae(tmp_path)
    assert ours.cfg.architecture == {"standard": "relu"}.get(which, which)
    x = torch.randn(64, 16)
    with torch.no_grad():
        assert torch.allclose(ours.encode(x), theirs.encode(x), atol=1e-5)
        assert torch.allclose(ours(x), theirs(x), atol=1e-5)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        load_sae(tmp_path)
    save_sae(_random_sae("relu"), tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["architecture"] = "gated"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="gated"):
        load_sae(tmp_path)
    with pytest.raises(ValueError, match="unknown SAE architecture"):
        SAEConfig(4, 8, "top-k")


@pytest.fixture(scope="module")
def tiny():
    model, tok = build_tiny("llama")
    return model.eval(), tok


def _store(tiny, **kw):
    require("common-licenses")
    model, tok = tiny
    args = dict(sources=("common-licenses",), context_size=32, batch_size=128, buffer_batches=4,
                windows_per_forward=8, holdout_every=5)
    args.update(kw)
    return ActivationStore(model, tok, StoreConfig(HOOK, **args))


def test_store_activations_are_the_models(tiny):
    model, tok = tiny
    store = _store(tiny, buffer_batches=2, holdout_every=0)
    # the stopped forward gives the activations of a full cached run, position 0 dropped
    ids = torch.tensor([next(store._windows) for _ in range(2)])
    _, cache = run_with_cache(model, ids, names=[HOOK])
    from workbench.sae import activations_at

    assert torch.equal(activations_at(model, ids, HOOK), cache[HOOK])
    batch = store.next_batch()
    assert batch.shape == (128, model.config.hidden_size) and batch.dtype == torch.float32
    assert store.norm_scale() > 0


def test_store_keeps_holdout_out_of_training(tiny):
    from workbench.data.windows import iter_token_windows

    _, tok = tiny
    store = _store(tiny)
    train = store._next_windows(12)
    held = store.eval_windows(3).tolist()
    raw = list(itertools.islice(iter_token_windows(tok, "common-licenses", 32), 15))
    assert held == raw[4::5] and train == [w for i, w in enumerate(raw) if i % 5 != 4]
    batch = store.next_batch()  # training goes on after evaluation windows were taken
    assert batch.shape[0] == 128


def test_eval_windows_reshuffle_the_buffer_once(tiny, monkeypatch):
    # reading many evaluation windows must not re-shuffle the growing buffer after every forward (quadratic)
    store = _store(tiny, windows_per_forward=2)
    calls = []
    real = store._add_to_buffer
    monkeypatch.setattr(store, "_add_to_buffer", lambda acts=None: (calls.append(acts.shape[0]), real(acts)))
    store.eval_windows(6)  # ~30 windows read two per forward, ~24 of them training windows
    assert len(calls) == 1 and calls[0] == store._buffer.shape[0] == store.produced - store.dropped >= 24 * 31


def test_metrics_identity_and_zero_sae(tiny):
    model, tok = tiny
    d = model.config.hidden_size
    # relu(x) - relu(-x) = x: a 2d-latent ReLU SAE that reconstructs exactly
    ident = SparseAutoencoder(SAEConfig(d, 2 * d, "relu", apply_b_dec_to_input=False))
    zero = SparseAutoencoder(SAEConfig(d, 2 * d, "relu"))
    with torch.no_grad():
        eye = torch.eye(d)
        ident.W_enc.copy_(torch.cat([eye, -eye], 1))
        ident.W_dec.copy_(torch.cat([eye, -eye], 0))
        ident.b_enc.zero_()
        ident.b_dec.zero_()
        zero.W_enc.zero_()
        zero.b_enc.fill_(-1.0)  # never fires
        zero.W_dec.zero_()
        zero.b_dec.zero_()
    windows = _store(tiny).eval_windows(4)
    m = evaluate_sae(ident, model, windows, HOOK)
    assert m["fvu"] == pytest.approx(0.0, abs=1e-6) and m["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    assert m["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-6) and m["ce_loss_clean"] == pytest.approx(m["ce_loss_with_sae"], abs=1e-5)
    z = evaluate_sae(zero, model, windows, HOOK)
    assert z["ce_loss_score"] == pytest.approx(0.0, abs=1e-6) and z["fvu"] > 0.99 and z["dead_fraction"] == 1.0
    assert z["ce_loss_with_ablation"] == pytest.approx(m["ce_loss_with_ablation"])
    # explained variance follows SAELens' streaming formula
    from sae_lens.evals import ExplainedVarianceCalculator

    sae = SparseAutoencoder(SAEConfig(d, 128, "topk", k=8))
    acts = run_with_cache(model, windows, names=[HOOK])[1][HOOK][:, 1:].reshape(-1, d)
    calc = ExplainedVarianceCalculator()
    with torch.no_grad():
        calc.add_batch(sae(acts), acts)
    assert evaluate_sae(sae, model, windows, HOOK, batch_size=3)["explained_variance"] == pytest.approx(calc.compute(), abs=1e-4)


def test_train_on_the_model_with_checkpoints_and_wandb(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    model, _ = tiny
    store = _store(tiny)
    scale = store.norm_scale()
    sae = SparseAutoencoder(SAEConfig(model.config.hidden_size, 256, "topk", k=8, hook_name=HOOK))
    res = train_sae(sae, store, TrainConfig(total_tokens=40 * 128, input_scale=scale, lr=2e-3, log_every=5,
                                            checkpoint_every_tokens=20 * 128, checkpoint_dir=str(tmp_path / "ckpt"),
                                            wandb_project="daert-test", accelerate=True, progress=False))
    assert res.tokens == 40 * 128 and res.history[-1]["fvu"] < res.history[0]["fvu"]
    ckpts = sorted((tmp_path / "ckpt").iterdir())
    assert [c.name for c in ckpts] == ["tokens_2560", "tokens_5120"]
    last = load_sae(ckpts[-1])
    x = store.next_batch()
    assert torch.allclose(last(x), sae(x), atol=1e-5)  # the last checkpoint is the final (scale-folded) SAE
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    m = evaluate_sae(sae, model, store.eval_windows(4), HOOK)
    assert 0 < m["fvu"] < 1 and m["l0"] <= 8


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.ctx, self.acts = [], 0, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "div" and a.get("id", "").startswith("feature-"):
            self.ids.append(int(a["id"].split("-")[1]))
        if tag == "div" and a.get("class") == "ctx":
            self.ctx += 1
            self.acts.append(float(a["data-activation"]))


def test_dashboard(tiny, tmp_path):
    model, tok = tiny
    sae = SparseAutoencoder(SAEConfig(model.config.hidden_size, 96, "topk", k=6))
    windows = _store(tiny).eval_windows(6)
    reports = feature_reports(sae, model, tok, windows, HOOK, n_features=4, n_examples=3)
    assert len(reports) == 4
    with torch.no_grad():
        f = sae.encode(run_with_cache(model, windows, names=[HOOK])[1][HOOK])[:, 1:]
    for r in reports:
        assert r.max_activation == pytest.approx(float(f[..., r.feature].max()), rel=1e-5)
        assert [e["activation"] for e in r.examples] == sorted((e["activation"] for e in r.examples), reverse=True)
        assert r.density == pytest.approx(float((f[..., r.feature] > 0).float().mean()), rel=1e-5)
        assert len(r.top_logits) == 8 and r.top_logits[0][1] >= r.top_logits[-1][1]
    html = render_dashboard(reports, title="tiny <test>")
    parser = _Collect()
    parser.feed(html)
    assert parser.ids == [r.feature for r in reports]
    assert parser.ctx == sum(len(r.examples) for r in reports)
    assert "tiny &lt;test&gt;" in html and "<script" not in html
    with pytest.raises(IndexError):
        feature_reports(sae, model, tok, windows, HOOK, features=[96])


def test_proportional_mix_spreads_every_source():
    from workbench.data.corpus import iter_documents
    from workbench.sae.store import _documents

    require("devil", "jargon")
    devil_docs = list(iter_documents("devil"))
    devil = set(devil_docs)
    stream = list(_documents(("devil", "jargon"), "proportional", seed=0))
    n_devil = sum(d in devil for d in stream)
    assert n_devil == len(devil_docs) and len(stream) == n_devil + sum(1 for _ in iter_documents("jargon"))
    share = n_devil / len(stream)
    first_half = stream[: len(stream) // 2]
    assert abs(sum(d in devil for d in first_half) / len(first_half) - share) < 0.05
    rr = list(_documents(("devil", "jargon"), "round-robin"))
    assert sum(d in devil for d in rr[: 2 * len(devil_docs)]) == len(devil_docs)  # round-robin: devil all used up early
    with pytest.raises(ValueError, match="unknown mix"):
        StoreConfig(HOOK, mix="random")


def test_two_process_training_equals_one_process(tmp_path):
    """The multi-GPU path (TrainConfig(accelerate=True): accelerate's DDP wrapper) on 2 CPU processes over gloo:
    each process trains on half of every batch; after one step, and after two (the second with AuxK on the
    latents the first left silent), both hold the weights of one process training on the whole batches."""
    import os
    import subprocess
    import sys

    import sae_ddp_worker as W
    from conftest import REPO

    # torchrun is what `accelerate launch` runs; ACCELERATE_USE_CPU=1 is what its --cpu sets (without it
    # accelerate ignores the process group on a CPU machine and every process trains alone)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(REPO / "tests" / "sae_ddp_worker.py"), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    init = W.sae().state_dict()
    for steps in W.STEPS:
        data = W.batches(steps)
        one, history = W.train(data, steps * W.BATCH)
        half, _ = W.train([b.chunk(2)[0] for b in data], steps * W.BATCH // 2)  # one process, half the data
        ranks = [torch.load(tmp_path / f"steps{steps}_rank{r}.pt") for r in range(2)]
        for name, ref in one.items():
            assert torch.equal(ranks[0][name], ranks[1][name]), name  # all-reduced gradients: identical steps
            # fp32: the mean of two half-batch gradients is the whole-batch mean up to rounding. Measured max
            # 1.2e-7 (one ulp of b_dec ~ 2); 1e-6 allows 8x that. Adam's first steps move every weight by ~lr
            # = 1e-2, and training on one half alone ends >= 1e-2 away: both far outside the tolerance.
            torch.testing.assert_close(ranks[0][name], ref, rtol=0, atol=1e-6, msg=name)
            assert float((ref - init[name]).abs().max()) > 5e-3, name
            assert float((half[name] - ref).abs().max()) > 1e-2, name
        if steps > 1:
            assert history[-1]["aux"] > 0  # the second step trained dead latents through AuxK
