"""Knowledge-editing metrics (workbench.surgery.metrics) against hand-computed values on tiny models.

The tiny byte-level models make every character one token. A hook on the LM head adds a large logit to chosen
tokens, so the argmax (and the order of the probabilities) is known by construction.
"""

import math

import pytest
import torch

from workbench.surgery.metrics import (
    EditMetrics,
    evaluate_requests,
    generate_texts,
    ngram_entropy,
    reference_predictions,
    score_pairs,
)
from workbench.surgery.requests import EditRequest, target_ids


@pytest.fixture
def tiny():
    from workbench.models.tiny import build_tiny

    return build_tiny("llama", seed=3)


class Boost:
    """Add ``value`` to the logits of the given tokens at every position (removed on exit); with ``replace``
    the logits are exactly the boosts (0 elsewhere), whatever the input."""

    def __init__(self, model, tok, boosts: dict[str, float], replace: bool = False):
        self.model, self.bias, self.keep = model, torch.zeros(model.config.vocab_size), 0.0 if replace else 1.0
        for ch, v in boosts.items():
            [i] = tok(ch, add_special_tokens=False).input_ids
            self.bias[i] = v

    def __enter__(self):
        self.h = self.model.lm_head.register_forward_hook(lambda m, i, o: o * self.keep + self.bias)
        return self

    def __exit__(self, *exc):
        self.h.remove()


def _logprobs_by_hand(model, tok, prompt, answer):
    """One unbatched forward of prompt + answer: log p of each answer token and the argmax before it."""
    p = tok(prompt, add_special_tokens=False).input_ids
    t = target_ids(tok, prompt, answer)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([p + t])).logits[0].float(), -1)
    rows = logp[len(p) - 1:len(p) + len(t) - 1]
    return [float(rows[j, t[j]]) for j in range(len(t))], rows.argmax(-1).tolist(), t


def test_score_pairs_equals_unbatched_forward(tiny):
    model, tok = tiny
    pairs = [("ab ", "xyz"), ("a much longer prompt ", "q"), ("hello ", "world!!"), ("z", "k")]
    scores = score_pairs(model, tok, pairs, batch_size=3)  # mixed lengths, right padding, two batches
    for (prompt, answer), s in zip(pairs, scores, strict=True):
        lp, am, t = _logprobs_by_hand(model, tok, prompt, answer)
        assert list(s.target) == t and list(s.argmax) == am
        assert s.logprobs == pytest.approx(lp, abs=1e-4)
        assert s.prob("sequence") == pytest.approx(math.exp(sum(lp)), rel=1e-3)
        assert s.prob("per_token") == pytest.approx(math.exp(sum(lp) / len(lp)), rel=1e-3)
    assert scores[3].target == tuple(target_ids(tok, "z", "k"))  # " k": the separating space is a token here
    assert len(scores[3].target) == 2


def test_argmax_equals_greedy_generation(tiny):
    model, tok = tiny
    prompt = "the cat sat on "
    ids = torch.tensor([tok(prompt, add_special_tokens=False).input_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    [s] = score_pairs(model, tok, [(prompt, "abc")])
    assert s.argmax[0] == int(out[0, -1])


def test_token_accuracy_and_greedy_on_known_argmax(tiny):
    model, tok = tiny
    with Boost(model, tok, {"Z": 60.0, "Y": 50.0}):  # argmax is "Z" everywhere, "Y" second
        s_all, s_two, s_none = score_pairs(model, tok, [("ab ", "ZZZ"), ("ab ", "ZaZ"), ("ab ", "YY")])
    assert s_all.token_acc == 1.0 and s_all.exact
    assert s_two.token_acc == pytest.approx(2 / 3) and not s_two.exact
    assert s_none.token_acc == 0.0 and not s_none.exact


def _request(new="Z", true="Y"):
    return EditRequest(prompt="The {} is ", subject="dog", target_new=new, target_true=true,
                       rephrase_prompts=["A dog is ", "My dog is ", "dog: "],
                       locality=[("The cat is ", "Y"), ("The cow is ", "YZ")],
                       portability=[("dog dog ", "ZZ")], case_id=7)


def test_both_families_by_hand(tiny):
    model, tok = tiny
    with Boost(model, tok, {"Z": 60.0, "Y": 50.0}):
        pre = evaluate_requests(model, tok, [_request()])
        [r] = pre.requests
        [pz, py] = [math.exp(sum(_logprobs_by_hand(model, tok, "The dog is ", a)[0])) for a in ("Z", "Y")]
    # EasyEdit: token accuracy of target_new "Z" (the argmax) on every prompt
    assert r.rewrite_acc == 1.0 and r.rephrase_acc == 1.0 and r.portability == 1.0
    assert r.locality is None  # no reference given
    # ROME: P(new="Z") > P(true="Y") on edit and paraphrase prompts; neighbourhood wants P(true) > P(new): 0
    assert r.efficacy_score == 1.0 and r.paraphrase_score == 1.0 and r.neighborhood_score == 0.0
    assert r.p_new == pytest.approx(pz, rel=1e-3) and r.p_true == pytest.approx(py, rel=1e-3)
    assert r.efficacy_magnitude == pytest.approx(pz - py, rel=1e-3)
    assert r.neighborhood_magnitude < 0
    # greedy: the edit prompt produces "Z"; locality answers "Y" / "YZ" are not the greedy answers
    assert r.rewrite_greedy == 1.0 and r.rephrase_greedy == 1.0 and r.neighborhood_greedy == 0.0
    assert r.portability_greedy == 1.0
    # swapping which token is boosted flips every comparison (negative control)
    with Boost(model, tok, {"Z": 50.0, "Y": 60.0}):
        [s] = evaluate_requests(model, tok, [_request()]).requests
    assert s.efficacy_score == 0.0 and s.paraphrase_score == 0.0 and s.neighborhood_score == 1.0
    assert s.rewrite_acc == 0.0 and s.rewrite_greedy == 0.0
    assert s.neighborhood_greedy == pytest.approx(0.5)  # "Y" is greedy; "YZ" is not ("Y" then "Y")


def test_multi_token_target_uses_sequence_probability(tiny):
    model, tok = tiny
    req = EditRequest(prompt="The dog is ", subject="dog", target_new="ZZZZ", target_true="Y")
    with Boost(model, tok, {"Z": 60.0, "Y": 59.5}, replace=True):  # log p(Z) = -0.47, log p(Y) = -0.97
        seq = evaluate_requests(model, tok, [req], prob="sequence").requests[0]
        per = evaluate_requests(model, tok, [req], prob="per_token").requests[0]
        lz = _logprobs_by_hand(model, tok, "The dog is ", "ZZZZ")[0]
        ly = _logprobs_by_hand(model, tok, "The dog is ", "Y")[0]
    assert seq.p_new == pytest.approx(math.exp(sum(lz)), rel=1e-3)
    assert per.p_new == pytest.approx(math.exp(sum(lz) / 4), rel=1e-3)
    # four tokens of "Z" are less likely as a sequence than one "Y", but more likely per token
    assert lz == pytest.approx([-math.log1p(math.exp(-0.5))] * 4, abs=1e-4)
    assert sum(lz) < sum(ly) and sum(lz) / 4 > sum(ly)
    assert seq.efficacy_score == 0.0 and per.efficacy_score == 1.0


def test_locality_is_one_when_unchanged_and_drops_after_a_weight_change(tiny):
    model, tok = tiny
    reqs = [_request(), EditRequest(prompt="xy ", subject="xy", target_new="a", target_true="b",
                                    locality=[("hello there ", "friend"), ("quick brown ", "fox jumps")])]
    pre = evaluate_requests(model, tok, reqs)
    same = evaluate_requests(model, tok, reqs, reference=pre)
    assert same["locality"] == 1.0 and all(r.locality == 1.0 for r in same.requests)
    assert evaluate_requests(model, tok, reqs, reference=reference_predictions(model, tok, reqs))["locality"] == 1.0
    with torch.no_grad():
        w = model.model.layers[1].mlp.down_proj.weight
        orig = w.clone()
        w.add_(torch.randn_like(w, generator=torch.Generator().manual_seed(0)) * 3.0)
    try:
        post = evaluate_requests(model, tok, reqs, reference=pre)
    finally:
        with torch.no_grad():
            w.copy_(orig)
    assert post["locality"] < 1.0
    # by hand: the fraction of locality answer positions whose argmax equals the pre-edit argmax
    ref = pre.reference()
    with torch.no_grad():
        w.add_(torch.randn_like(w, generator=torch.Generator().manual_seed(0)) * 3.0)
    try:
        fracs = [[sum(a == b for a, b in zip(_logprobs_by_hand(model, tok, p, a_)[1], ref[(p, a_)], strict=True))
                  / len(ref[(p, a_)]) for p, a_ in r.locality] for r in reqs]
    finally:
        with torch.no_grad():
            w.copy_(orig)
    assert [r.locality for r in post.requests] == pytest.approx([sum(f) / len(f) for f in fracs])
    # the reference must cover the locality prompts
    with pytest.raises(KeyError, match="reference lacks"):
        evaluate_requests(model, tok, reqs, reference={})


def test_locality_against_another_model_is_below_one(tiny):
    from workbench.models.tiny import build_tiny

    model, tok = tiny
    other, _ = build_tiny("llama", seed=4)
    reqs = [_request()]
    assert evaluate_requests(model, tok, reqs, reference=evaluate_requests(other, tok, reqs))["locality"] < 1.0


def test_ngram_entropy_by_hand():
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))  # bigrams (a,b) x2, (b,a) x1
    h3 = 1.0  # trigrams (a,b,a), (b,a,b)
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
    assert ngram_entropy("the the the the the") == 0.0
    words = " ".join(f"w{i}" for i in range(9))  # all distinct: 8 bigrams, 7 trigrams
    assert ngram_entropy(words) == pytest.approx((2 / 3 * math.log2(8) + 4 / 3 * math.log2(7)) / 2)
    assert ngram_entropy("") == 0.0
    assert ngram_entropy("Hello, world.") > 0  # punctuation is a word


def test_fluency_and_generation_are_seeded(tiny):
    model, tok = tiny
    req = _request()
    a = evaluate_requests(model, tok, [req], fluency=True, generation_tokens=12).requests[0]
    b = evaluate_requests(model, tok, [req], fluency=True, generation_tokens=12).requests[0]
    assert a.generation == b.generation and a.fluency == b.fluency == ngram_entropy(a.generation)
    assert evaluate_requests(model, tok, [req]).requests[0].fluency is None
    with Boost(model, tok, {"Z": 100.0}):  # a degenerate model repeats one token: entropy 0
        [text] = generate_texts(model, tok, ["The dog is "], max_new_tokens=10, greedy=True)
    assert text == "Z" * 10 and ngram_entropy(text) == 0.0


def test_to_dict_and_table_name_the_families(tiny):
    model, tok = tiny
    plain = EditRequest(prompt="ab ", subject="ab", target_new="c")  # no target_true: no ROME comparisons
    m = evaluate_requests(model, tok, [_request(), plain])
    assert isinstance(m, EditMetrics)
    d = m.to_dict()
    assert set(d["easyedit"]) == {"rewrite_acc", "rephrase_acc", "locality", "portability"}
    assert {"efficacy_score", "paraphrase_score", "neighborhood_score", "fluency"} <= set(d["rome"])
    assert {"rewrite_greedy", "rephrase_greedy", "neighborhood_greedy"} <= set(d["greedy"])
    assert d["n_requests"] == 2 and len(d["per_request"]) == 2
    assert d["per_request"][1]["rome"]["efficacy_score"] is None
    # aggregate = mean over requests, leaving None out
    assert d["rome"]["efficacy_score"] == m.requests[0].efficacy_score
    assert d["easyedit"]["rewrite_acc"] == pytest.approx(sum(r.rewrite_acc for r in m.requests) / 2)
    text = m.table(per_request=True)
    for name in ("easyedit", "rome", "greedy", "rewrite_acc", "efficacy_score", "neighborhood_greedy"):
        assert name in text
    with pytest.raises(KeyError):
        m["no_such_metric"]


def test_edit_changes_the_metrics(tiny):
    """A change that makes "Z" the argmax everywhere: the edit metrics reach 1, neighbourhood and locality drop."""
    model, tok = tiny
    req = EditRequest(prompt="The {} is ", subject="dog", target_new="Z", target_true="Y",
                      locality=[("The cat is ", "Y")])
    pre = evaluate_requests(model, tok, [req])
    assert pre.requests[0].rewrite_greedy in (0.0, 1.0)
    with Boost(model, tok, {"Z": 100.0}):
        post = evaluate_requests(model, tok, [req], reference=pre)
    assert post["rewrite_greedy"] == 1.0 and post["efficacy_score"] == 1.0
    assert post["neighborhood_score"] == 0.0 and post["locality"] < 1.0
