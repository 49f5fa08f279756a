import math

import pytest
import torch

from workbench.data.windows import token_windows
from workbench.eval.perplexity import perplexity


@pytest.fixture(scope="module")
def windows(tiny_llama):
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
    with torch.no_grad():
        model.lm_head.weight.zero_()  # tied to the embeddings in GPT-2: untie first
    model.lm_head.weight = torch.nn.Parameter(torch.zeros_like(model.lm_head.weight))
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
