"""The engine, evaluation and SAE paths on a CUDA device (skipped without one; run on a GPU machine with
``make test-gpu``). References are the same computations on CPU or HF generate on the same device."""

import pytest
import stats
import torch

from workbench.engine import Engine, GenerationConfig, SamplingParams
from workbench.models.tiny import build_tiny

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPTS = ["hello there", "a", "the quick brown fox jumps", "xyz 123 !"]


@pytest.fixture(scope="module")
def tiny_cuda():
    model, tok = build_tiny("llama")
    return model.to("cuda", torch.float32).eval(), tok


def test_greedy_on_cuda_equals_hf_generate(tiny_cuda):
    model, tok = tiny_cuda
    tok.padding_side = "left"
    enc = tok.pad({"input_ids": [tok(p)["input_ids"] for p in PROMPTS]}, return_tensors="pt").to("cuda")
    ref = model.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id,
                         eos_token_id=None, min_new_tokens=16)[:, enc["input_ids"].shape[1]:].tolist()
    res = Engine(model, tok).generate(PROMPTS, GenerationConfig(max_new_tokens=16, ignore_eos=True))
    assert [r.token_ids for r in res] == ref


@pytest.mark.parametrize("new_tokens", [2, 16])  # 2: the graph is captured with one cache slot left
def test_cuda_graph_decode_greedy_equals_hf_generate(tiny_cuda, new_tokens):
    model, tok = tiny_cuda
    tok.padding_side = "left"
    enc = tok.pad({"input_ids": [tok(p)["input_ids"] for p in PROMPTS]}, return_tensors="pt").to("cuda")
    ref = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                         eos_token_id=None, min_new_tokens=new_tokens)[:, enc["input_ids"].shape[1]:].tolist()
    cfg = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)
    res = Engine(model, tok, graphs="cuda").generate(PROMPTS, cfg)
    assert [r.token_ids for r in res] == ref


def test_cuda_graph_draws_inside_the_graph_as_the_eager_engine(tiny_cuda):
    # the Triton sampler replayed from the graph, its step counter read from device memory: the same tokens
    # as the engine launching it at every step (one greedy row rides along)
    model, tok = tiny_cuda
    cfgs = [GenerationConfig(max_new_tokens=12, ignore_eos=True, seed=i,
                             sampling=SamplingParams(temperature=0.0 if i == 1 else 0.9, top_p=0.95))
            for i in range(len(PROMPTS))]
    off = Engine(model, tok, sampler="triton").generate(PROMPTS, cfgs)
    on = Engine(model, tok, sampler="triton", graphs="cuda").generate(PROMPTS, cfgs)
    assert [r.token_ids for r in on] == [r.token_ids for r in off]


def test_cuda_graph_replay_reads_weights_edited_in_place(tiny_cuda):
    # negate the LM head after 3 tokens of a stream: the replayed graph must pick up the new values
    model, tok = tiny_cuda
    cfg = GenerationConfig(max_new_tokens=10, ignore_eos=True)
    head = model.get_output_embeddings().weight

    def run(**kw):
        out = []
        try:
            for i, e in enumerate(Engine(model, tok, **kw).stream(["hello there"], cfg)):
                out.append(e.token_id)
                if i == 2:
                    with torch.no_grad():
                        head.neg_()
        finally:
            if len(out) > 2:
                with torch.no_grad():
                    head.neg_()
        return out

    plain = Engine(model, tok).generate(["hello there"], cfg)[0].token_ids
    edited = run()
    assert edited[:3] == plain[:3] and edited != plain
    assert run(graphs="cuda") == edited


def test_triton_sampler_in_the_engine_matches_the_model_distribution(tiny_cuda):
    # One prompt, first token only: 20k draws through the fused Triton sampler, one request each with its own
    # seed, against softmax(logits / T) restricted to the top-p nucleus, with the shared harness (tests/stats.py):
    # no draw outside the nucleus, every nucleus token drawn (its lightest, ~0.18%, is expected ~36 times; a
    # sampler that drops it fails), pooled chi-square p > 1e-3. The negative control checks that power.
    from workbench.kernels.sampling import filtered_probs

    model, tok = tiny_cuda
    eng = Engine(model, tok, sampler="triton")
    params = SamplingParams(temperature=0.8, top_p=0.9)
    n = 20_000
    cfgs = [GenerationConfig(max_new_tokens=1, ignore_eos=True, seed=s, sampling=params) for s in range(n)]
    res = eng.generate(["the quick"] * n, cfgs)
    with torch.no_grad():
        logits = model(torch.tensor([res[0].prompt_ids], device="cuda")).logits[0, -1].float()
    probs = filtered_probs(logits[None], 0.8, top_p=0.9)[0].cpu()
    counts = torch.bincount(torch.tensor([r.token_ids[0] for r in res]), minlength=probs.numel())
    stats.check_draws(counts, probs, all_covered=True)
    stats.assert_detects_a_dropped_token(probs, n)


def test_length_ppl_on_cuda_equals_cpu():
    from workbench.eval.long_context import length_ppl

    model, _ = build_tiny("llama")
    windows = torch.randint(0, model.config.vocab_size, (2, 96), generator=torch.Generator().manual_seed(0))
    cpu = length_ppl(model.float().eval(), windows, bucket=32, progress=False)
    gpu = length_ppl(model.to("cuda"), windows, bucket=32, progress=False)
    assert gpu.ppl == pytest.approx(cpu.ppl, rel=1e-4)


def test_sae_training_on_cuda_reduces_reconstruction_error():
    from workbench.sae import SAEConfig, SparseAutoencoder, TrainConfig, train_sae

    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(48, 16, generator=gen)
    codes = torch.rand(4096, 48, generator=gen) * (torch.rand(4096, 48, generator=gen) < 0.08)
    data = (codes @ basis).cuda()
    batches = (data[i: i + 256] for _ in range(20) for i in range(0, 4096, 256))
    sae = SparseAutoencoder(SAEConfig(16, 64, "topk", k=6)).cuda()
    with torch.no_grad():
        before = float((sae.decode(sae.encode(data)) - data).pow(2).mean())
    result = train_sae(sae, batches, TrainConfig(total_tokens=4096 * 20, lr=3e-3, log_every=10))
    with torch.no_grad():
        after = float((sae.decode(sae.encode(data)) - data).pow(2).mean())
    assert result.tokens == 4096 * 20
    assert after < 0.2 * before
