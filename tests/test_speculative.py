"""Speculative decoding: greedy output equals plain greedy; sampled output follows the target distribution."""

import pytest
import torch
from scipy.stats import chisquare

from workbench.engine import Engine, GenerationConfig, SamplingParams
from workbench.engine.speculative import SpeculativeConfig
from workbench.models.tiny import build_tiny

PROMPTS = ["abcabcabcabc hello hello hello", "xyz", "the quick brown fox jumps over the quick brown"]


@pytest.fixture(scope="module", params=[("llama", "packed-llama"), ("llama", "hf"), ("gpt2", "hf")],
                ids=lambda p: "-".join(p))
def target(request):
    arch, backend = request.param
    model, tok = build_tiny(arch)
    return Engine(model, tok, backend=backend)


@pytest.fixture(scope="module")
def draft():
    return build_tiny("gpt2")


@pytest.mark.parametrize("proposer", ["prompt-lookup", "draft-model", "self-draft"])
def test_greedy_equals_plain_greedy(target, draft, proposer):
    plain = target.generate(PROMPTS, GenerationConfig(max_new_tokens=30, ignore_eos=True))
    draft_arg = {"draft-model": draft, "self-draft": target}.get(proposer)
    cfg = SpeculativeConfig(max_new_tokens=30, ignore_eos=True, draft=draft_arg,
                            proposer="prompt-lookup" if proposer == "prompt-lookup" else "draft-model")
    res = target.generate(PROMPTS, cfg, strategy="speculative")
    assert [r.token_ids for r in res] == [p.token_ids for p in plain]
    assert all(r.finish_reason == "length" and 0 <= r.stats.accepted <= r.stats.proposed for r in res)
    if proposer == "self-draft":  # a draft identical to the target is always accepted
        assert all(r.stats.accepted == r.stats.proposed > 0 and r.stats.steps < 10 for r in res)


def test_greedy_eos_and_length_per_request(target):
    free = target.generate(["hello"], GenerationConfig(max_new_tokens=12, ignore_eos=True))[0].token_ids
    stop = free[6]
    cfgs = SpeculativeConfig(max_new_tokens=12, eos_token_ids=(stop,))
    [res] = target.generate(["hello"], cfgs, strategy="speculative")
    assert res.token_ids == free[: free.index(stop)] and res.finish_reason == "eos"


def exact_second_token_dist(engine, prompt_ids, top_k):
    """P(t2) under the target with temperature 1 and top-k, enumerating t1."""
    model = engine.model
    with torch.no_grad():
        l1 = model(torch.tensor([prompt_ids])).logits[0, -1]
        v1, i1 = l1.topk(top_k)
        p1 = v1.softmax(-1)
        dist = torch.zeros(l1.shape[0])
        for p, t in zip(p1, i1, strict=True):
            l2 = model(torch.tensor([prompt_ids + [int(t)]])).logits[0, -1]
            v2, i2 = l2.topk(top_k)
            dist[i2] += p * v2.softmax(-1)
    return dist


class FixedTokens:
    """A point-mass proposer that always drafts the same tokens (registered for the test only)."""

    point_mass = True
    tokens: list = []

    def __init__(self, cfg, **_):
        pass

    def start(self, engine, contexts, params, gens, extra):
        pass

    def propose(self, ks):
        return [self.tokens[:k] for k in ks], None

    def commit(self, row, accepted, drafts, new):
        pass


@pytest.fixture(scope="module")
def near_draft():
    """The target with perturbed weights: a draft that agrees often, but not always."""
    model, tok = build_tiny("llama")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model, tok


@pytest.mark.parametrize("proposer", ["fixed-tokens", "draft-model"])
def test_sampled_output_follows_target(proposer, near_draft):
    draft = near_draft
    from workbench.engine.speculative import PROPOSERS, register_proposer

    model, tok = build_tiny("llama")
    eng = Engine(model, tok)
    prompt = tok("abababababab")["input_ids"]
    N, k = 600, 4
    torch.manual_seed(0)
    with torch.no_grad():
        likely = model(torch.tensor([prompt])).logits[0, -1].topk(2).indices.tolist()
    FixedTokens.tokens = likely  # drafts inside the support: some accepted, some not
    register_proposer("fixed-tokens", FixedTokens)
    try:
        cfg = SpeculativeConfig(max_new_tokens=3, ignore_eos=True, proposer=proposer, num_draft=2,
                                sampling=SamplingParams(temperature=1.0, top_k=k), draft=draft)
        res = eng.generate([prompt] * N, cfg, strategy="speculative")
    finally:
        PROPOSERS.pop("fixed-tokens")
    assert sum(r.stats.proposed for r in res) >= N and sum(r.stats.accepted for r in res) > 0  # drafts really verified
    second = torch.tensor([r.token_ids[1] for r in res])
    dist = exact_second_token_dist(eng, prompt, k)
    support = dist > 0
    counts = torch.bincount(second, minlength=dist.shape[0]).float()
    assert counts[~support].sum() == 0
    assert chisquare(counts[support], dist[support] * N / dist[support].sum()).pvalue > 1e-3


def test_bad_configs():
    from workbench.errors import UnknownNameError

    with pytest.raises(UnknownNameError, match="unknown proposer 'ngram'"):
        SpeculativeConfig(proposer="ngram")
    with pytest.raises(ValueError, match="penalties"):
        SpeculativeConfig(sampling=SamplingParams(repetition_penalty=1.2))
    with pytest.raises(ValueError, match="num_draft"):
        SpeculativeConfig(num_draft=0)
    model, tok = build_tiny("llama")
    with pytest.raises(ValueError, match=r"needs SpeculativeConfig\(draft="):
        Engine(model, tok).generate(["x"], SpeculativeConfig(proposer="draft-model"), strategy="speculative")


@pytest.mark.realmodel
@pytest.mark.parametrize("batch", [1, 2])
def test_smollm2_prompt_lookup_greedy_equals_plain(smollm2, batch):
    from workbench.chat import prompt_ids

    model, tok = smollm2
    text = ("The Rhine rises in the Swiss Alps, forms part of the Swiss-Austrian, Swiss-Liechtenstein, "
            "Swiss-German and then the Franco-German border, then flows through the German Rhineland and the "
            "Netherlands and eventually empties into the North Sea.")
    qs = [f"Repeat this text exactly:\n{text}", "Write one sentence about the sea."][:batch]
    ids = [prompt_ids(tok, [{"role": "user", "content": q}]) for q in qs]
    eng = Engine(model, tok)
    plain = eng.generate(ids, GenerationConfig(max_new_tokens=40))
    spec = eng.generate(ids, SpeculativeConfig(max_new_tokens=40), strategy="speculative")
    assert [s.token_ids for s in spec] == [p.token_ids for p in plain]
    assert spec[0].stats.tokens_per_step > 1.5  # the copy task is accepted in long runs
