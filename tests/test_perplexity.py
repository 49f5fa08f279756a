import math

import pytest
import torch
from corpora import require

from workbench.data.windows import token_windows
from workbench.eval.perplexity import perplexity


@pytest.fixture(scope="module")
def windows(tiny_llama):
    require("gpl-3")
    return token_windows(tiny_llama[1], "gpl-3", 48, max_windows=5)


def test_matches_hf_loss(tiny_llama, windows):
    model, _ = tiny_llama
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    res = perplexity(model, windows, batch_size=2, progress=False)
    # Equal-length windows: the token-weighted mean equals the mean of per-window means.
    assert res.nll == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert res.ppl == pytest.approx(math.exp(res.nll), rel=1e-12)
    assert (res.n_tokens, res.n_windows, res.window) == (5 * 47, 5, 48)


def test_batch_size_invariant(tiny_llama, windows):
    a = perplexity(tiny_llama[0], windows, batch_size=1, progress=False)
    b = perplexity(tiny_llama[0], windows, batch_size=5, progress=False)
    assert a.nll == pytest.approx(b.nll, rel=1e-5)


def test_uniform_model_has_vocab_perplexity(windows):
    from workbench.models.tiny import build_tiny

    model, tok = build_tiny("gpt2", seed=1)
    emb = model.get_input_embeddings().weight
    assert model.lm_head.weight is emb  # tied to the embeddings in GPT-2: untie first, then zero the head
    before = emb.detach().clone()
    model.lm_head.weight = torch.nn.Parameter(emb.detach().clone())
    with torch.no_grad():
        model.lm_head.weight.zero_()
    # the head alone is zero: the embeddings still feed real hidden states into it
    assert model.lm_head.weight.data_ptr() != emb.data_ptr() and torch.equal(emb, before) and before.abs().sum() > 0
    res = perplexity(model, windows, progress=False)
    assert res.ppl == pytest.approx(len(tok), rel=1e-5)


def test_bad_inputs(tiny_llama, windows):
    model, _ = tiny_llama
    with pytest.raises(ValueError, match="int64"):
        perplexity(model, windows.float(), progress=False)
    with pytest.raises(ValueError, match="window>=2"):
        perplexity(model, windows[:, :1], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(model, windows, batch_size=0, progress=False)
