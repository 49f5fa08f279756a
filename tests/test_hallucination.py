"""Hallucination detection: token scores against HF logits, sampling against the engine, semantic entropy and
its judges, P(True), probes, metrics against scikit-learn, the QA rule and data set, the detector registry."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from workbench.engine import Engine, GenerationConfig, SamplingParams
from workbench.errors import ModelUnavailableError, UnknownNameError
from workbench.hallucination import (
    AnswerConfig,
    ExactMatchJudge,
    Generation,
    LinearProbe,
    LMJudge,
    NLIJudge,
    ProbeConfig,
    PTrueConfig,
    QAItem,
    Sample,
    SemanticEntropyConfig,
    analyse_samples,
    answer_prompt,
    aurac,
    aurac_oracle,
    auroc,
    binarize_entropy,
    bootstrap_ci,
    bootstrap_diff,
    cluster_answers,
    cross_validated_scores,
    detector_names,
    discrete_semantic_entropy,
    generate_answers,
    is_correct,
    is_correct_prefix,
    load_qa,
    make_detector,
    make_judge,
    normalize_answer,
    p_true,
    ptrue_prompt,
    rejection_accuracy_curve,
    roc_curve,
    sample_answers,
    semantic_entropy,
    train_probe,
)
from workbench.hallucination.qa import check_items
from workbench.threads import ThreadPolicy

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is up?", "Name a colour.", "Why?", "Who wrote the long book about the sea and a whale?"]
# plain-text prompts: with the chat template the tiny random model repeats one token, which tests less
CFG = AnswerConfig(instruction="Answer.", shots=(("Q?", "A"),), chat=False, max_new_tokens=6, stop_strings=(),
                   batch_size=3)
CHAT = AnswerConfig(shots=(("Q?", "A"),), max_new_tokens=6, batch_size=3)


@pytest.fixture(scope="module", params=["packed-llama", "hf"])
def engine(request, tiny_llama):
    model, tok = tiny_llama
    return Engine(model, tok, threads=ThreadPolicy(1, 1), backend=request.param)


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


# -- token scores and recorded states ---------------------------------------------------------------------


def test_token_logprobs_and_entropies_equal_hf(engine):
    model = engine.model
    gens = generate_answers(engine, QUESTIONS, CFG)  # batches of 3 and 1, ragged prompts
    assert len(gens) == len(QUESTIONS)
    for g in gens:
        assert g.finish_reason == "length" and len(g.token_ids) == 6 == len(g.token_logprobs)
        P = len(g.prompt_ids)
        logits = hf_logits(model, g.prompt_ids + g.token_ids)[P - 1: P - 1 + len(g.token_ids)]
        logp = torch.log_softmax(logits, -1)
        direct = logp.gather(1, torch.tensor(g.token_ids)[:, None])[:, 0]
        np.testing.assert_allclose(g.token_logprobs, direct.numpy(), atol=2e-4)
        ent = torch.distributions.Categorical(logits=logits).entropy()
        np.testing.assert_allclose(g.token_entropies, ent.numpy(), atol=2e-4)
        # greedy: every chosen token is the argmax
        assert g.token_ids == logits.argmax(-1).tolist()
    s = make_detector("token-logprob").score(gens)
    np.testing.assert_allclose(s, [-np.mean(g.token_logprobs) for g in gens])
    mx = make_detector("token-entropy").score(gens)
    mean = make_detector("token-entropy", reduce="mean").score(gens)
    np.testing.assert_allclose(mx, [max(g.token_entropies) for g in gens])
    np.testing.assert_allclose(mean, [np.mean(g.token_entropies) for g in gens])
    assert (mx >= mean).all() and (mx > mean).any()


def test_recorded_hidden_states_equal_hf(engine):
    model = engine.model
    [g] = generate_answers(engine, QUESTIONS[:1], CHAT)
    assert g.prompt_ids == answer_prompt(engine.tokenizer, QUESTIONS[0], CHAT)
    assert "<|im_start|>assistant\nA<|im_end|>" in engine.tokenizer.decode(g.prompt_ids)
    assert g.layers == (0, 1) and g.features["tbg"].shape == (2, 64) == g.features["slt"].shape
    P, n = len(g.prompt_ids), len(g.token_ids)
    with torch.no_grad():
        hs = model(torch.tensor([g.prompt_ids + g.token_ids]), output_hidden_states=True).hidden_states
    # hidden_states[i + 1] is the output of block i (the last one after the final norm in HF: compare block 0)
    np.testing.assert_allclose(g.feature("tbg", 0), hs[1][0, P - 1].numpy(), atol=2e-4)
    # slt: input of the step that produced the last token (length-limited: the second-last token)
    np.testing.assert_allclose(g.feature("slt", 0), hs[1][0, P + n - 2].numpy(), atol=2e-4)
    with pytest.raises(KeyError, match="not recorded"):
        g.feature("tbg", 5)


def test_eos_is_scored_and_slt_is_the_last_answer_token(engine):
    model = engine.model
    # make a greedy token that did not occur before it the EOS: the answer stops just before it
    q, j, free = next((q, j, f) for q, f in zip(QUESTIONS, generate_answers(engine, QUESTIONS, CFG), strict=True)
                      for j in range(1, len(f.token_ids)) if f.token_ids[j] not in f.token_ids[:j])
    eos = free.token_ids[j]
    cfg = AnswerConfig(CFG.instruction, CFG.shots, chat=False, max_new_tokens=6, eos_token_ids=(eos,), layers=(1,))
    [g] = generate_answers(engine, [q], cfg)
    assert g.finish_reason == "eos" and g.token_ids == free.token_ids[:j]
    assert len(g.token_logprobs) == j + 1 and g.layers == (1,)
    P = len(g.prompt_ids)
    logp = torch.log_softmax(hf_logits(model, g.prompt_ids + g.token_ids + [eos]), -1)
    direct = [logp[P - 1 + j, t].item() for j, t in enumerate(g.token_ids + [eos])]
    np.testing.assert_allclose(g.token_logprobs, direct, atol=2e-4)
    from workbench.interp import run_with_cache

    _, cache = run_with_cache(model, torch.tensor([g.prompt_ids + g.token_ids]), names="blocks.1.hook_resid_post")
    # an EOS ended the answer: slt is the last answer token, the position that predicted the EOS
    np.testing.assert_allclose(g.feature("slt", 1), cache["blocks.1.hook_resid_post"][0, -1].numpy(), atol=2e-4)


def test_stop_string_answer(tiny_llama):
    model, tok = tiny_llama
    eng = Engine(model, tok, threads=ThreadPolicy(1, 1))
    [free] = generate_answers(eng, QUESTIONS[:1], CFG)
    stop = tok.decode(free.token_ids[1:2])
    [g] = generate_answers(eng, QUESTIONS[:1], AnswerConfig(CFG.instruction, CFG.shots, chat=False, max_new_tokens=6,
                                                            stop_strings=(stop,)))
    assert g.finish_reason == "stop" and stop not in g.text
    assert len(g.token_logprobs) == len(g.token_ids)


def test_sample_answers_equal_engine_generate(engine):
    prompts = [g.prompt_ids for g in generate_answers(engine, QUESTIONS[:2], CFG)]
    sp = SamplingParams(temperature=1.0, top_k=50)
    got = sample_answers(engine, prompts, 3, sp, max_new_tokens=6, seed=11)
    assert [len(s) for s in got] == [3, 3]
    for p, samples in zip(prompts, got, strict=True):
        for j, s in enumerate(samples):
            ref = engine.generate([p], GenerationConfig(max_new_tokens=6, sampling=sp, seed=11 + j, logprobs=0,
                                                        stop_strings=("\n",)))[0]
            assert s.token_ids == ref.token_ids and s.text == ref.text
            np.testing.assert_allclose(s.logprobs[: len(ref.logprobs)], [t.logprob for t in ref.logprobs], atol=1e-5)
    assert len({tuple(s.token_ids) for s in got[0]}) > 1  # different seeds, different samples


# -- semantic entropy ----------------------------------------------------------------------------------


def test_semantic_entropy_hand_computed():
    ll = [-1.0, -1.0, -2.0, -3.0]
    ids = [0, 0, 1, 2]
    w = [2 * math.exp(-1), math.exp(-2), math.exp(-3)]
    p = [x / sum(w) for x in w]
    assert semantic_entropy(ll, ids) == pytest.approx(-sum(q * math.log(q) for q in p), rel=1e-12)
    assert semantic_entropy(ll, [0, 0, 0, 0]) == pytest.approx(0.0, abs=1e-12)
    # equal likelihoods: the discrete variant
    assert semantic_entropy([-2.0] * 4, ids) == pytest.approx(discrete_semantic_entropy(ids))
    with pytest.raises(ValueError):
        semantic_entropy([-1.0], [0, 1])


def test_discrete_semantic_entropy():
    assert discrete_semantic_entropy([0, 0, 1, 1]) == pytest.approx(math.log(2))
    assert discrete_semantic_entropy([0, 1, 2, 3]) == pytest.approx(math.log(4))
    assert discrete_semantic_entropy([3, 3, 3]) == 0.0
    assert discrete_semantic_entropy([0, 0, 0, 1]) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))


def test_exact_match_judge_and_clusters():
    j = ExactMatchJudge()
    assert j.equivalent("q", "Paris.", ["paris", "The Paris", "Paris, France", "Lyon"]) == [True, True, False, False]
    assert cluster_answers("q", ["Paris", "Lyon", "paris!", "Nice", "lyon"], j) == [0, 1, 0, 2, 1]
    samples = [Sample([1], t, "eos", [lp]) for t, lp in [("Paris", -0.1), ("paris", -0.2), ("Lyon", -2.0)]]
    r = analyse_samples("q", samples, j)
    assert r.cluster_ids == [0, 0, 1]
    assert r.entropy == pytest.approx(semantic_entropy([-0.1, -0.2, -2.0], [0, 0, 1]))
    assert r.discrete_entropy == pytest.approx(discrete_semantic_entropy([0, 0, 1]))
    assert make_judge("exact-match") == j


def test_clustering_compares_with_the_cluster_opener():
    class Prefix:  # not transitive: "a" ~ "ab", "ab" ~ "abc", "a" !~ "abc"
        def equivalent(self, q, anchor, others):
            return [abs(len(anchor) - len(o)) <= 1 and (o.startswith(anchor) or anchor.startswith(o)) for o in others]

    assert cluster_answers("q", ["a", "ab", "abc"], Prefix()) == [0, 0, 1]


def _tiny_nli(tmp_path, bias=None):
    from transformers import BertConfig, BertForSequenceClassification

    from workbench.models.tiny import byte_tokenizer

    tok = byte_tokenizer()
    labels = {0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"}
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512, num_labels=3, id2label=labels,
                     label2id={v: k for k, v in labels.items()}, pad_token_id=tok.pad_token_id, initializer_range=1.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertForSequenceClassification(cfg).eval()
    if bias is not None:
        with torch.no_grad():
            model.classifier.bias.copy_(torch.tensor(bias))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return model, tok


def test_nli_judge_from_a_local_folder(tmp_path):
    model, tok = _tiny_nli(tmp_path)
    judge = NLIJudge.from_pretrained(str(tmp_path))
    q, prem, hyp = "Capital?", ["Paris", "Lyon is big", "x"], ["paris", "Lyon", "a longer answer here"]
    got = judge.labels(q, prem, hyp)
    want = []
    for p, h in zip(prem, hyp, strict=True):
        with torch.no_grad():
            want.append(int(model(**tok(f"{q} {p}", f"{q} {h}", return_tensors="pt")).logits.argmax()))
    assert got == want  # padding in a batch changes nothing; labels 0/1/2 as CONTRADICTION/NEUTRAL/ENTAILMENT
    assert len(set(judge.labels(q, ["a", "bb", "ccc", "dddd", "e e e"] * 2, ["zz", "y", "x x", "w", "v"] * 2))) > 1
    eq = judge.equivalent(q, "Paris", ["paris", "Lyon"])
    fwd, bwd = judge.labels(q, ["Paris", "Paris"], ["paris", "Lyon"]), judge.labels(q, ["paris", "Lyon"], ["Paris"] * 2)
    assert eq == [f == 2 and b == 2 for f, b in zip(fwd, bwd, strict=True)]


def test_nli_judge_bias_decides_clusters(tmp_path):
    answers = ["Paris", "Lyon", "Nice", "Rome"]
    _tiny_nli(tmp_path / "yes", bias=[0.0, 0.0, 50.0])
    _tiny_nli(tmp_path / "no", bias=[50.0, 0.0, 0.0])
    _tiny_nli(tmp_path / "neutral", bias=[0.0, 50.0, 0.0])
    assert cluster_answers("q", answers, make_judge("nli", str(tmp_path / "yes"))) == [0, 0, 0, 0]
    assert cluster_answers("q", answers, make_judge("nli", str(tmp_path / "no"))) == [0, 1, 2, 3]
    assert cluster_answers("q", answers, make_judge("nli", str(tmp_path / "neutral"))) == [0, 1, 2, 3]
    # non-strict: neither direction contradicts, but both neutral is still not equivalent
    assert cluster_answers("q", answers, NLIJudge.from_pretrained(str(tmp_path / "neutral"), strict=False)) == [0, 1, 2, 3]


def test_nli_judge_missing_folder(tmp_path):
    with pytest.raises(ModelUnavailableError, match="exact-match"):
        NLIJudge.from_pretrained(str(tmp_path / "nothing-here"))


def test_lm_judge_equals_direct_computation(tiny_llama):
    model, tok = tiny_llama
    eng = Engine(model, tok, threads=ThreadPolicy(1, 1))
    judge = LMJudge(eng)
    lp = judge.label_logprobs("Capital?", ["Paris", "Lyon"], ["paris", "Rome"])
    for row, (a, b) in enumerate([("Paris", "paris"), ("Lyon", "Rome")]):
        logp = torch.log_softmax(hf_logits(model, judge.prompt_ids("Capital?", a, b))[-1], -1)
        raw = torch.stack([logp[ts].logsumexp(-1) for ts in judge.label_tokens])
        np.testing.assert_allclose(lp[row].numpy(), (raw - raw.logsumexp(-1)).numpy(), atol=1e-4)
    assert judge.labels("Capital?", ["Paris"], ["paris"]) == [int(lp[0].argmax())]
    assert len(judge.equivalent("Capital?", "Paris", ["paris", "Rome"])) == 2


def test_semantic_entropy_detectors(tiny_llama):
    model, tok = tiny_llama
    eng = Engine(model, tok, threads=ThreadPolicy(1, 1))
    gens = generate_answers(eng, QUESTIONS[:3], CFG)
    cfg = SemanticEntropyConfig(n_samples=4, max_new_tokens=4, batch_prompts=2, seed=3)
    det = make_detector("semantic-entropy", engine=eng, config=cfg)
    res = det.analyse(gens)
    assert [len(r.samples) for r in res] == [4, 4, 4]
    for r in res:
        assert r.entropy == pytest.approx(semantic_entropy([s.mean_logprob() for s in r.samples], r.cluster_ids))
        assert r.cluster_ids == cluster_answers("", [s.answer for s in r.samples], ExactMatchJudge())
    np.testing.assert_allclose(det.score(gens), [r.entropy for r in res])
    disc = make_detector("semantic-entropy-discrete", engine=eng, config=cfg).score(gens)
    np.testing.assert_allclose(disc, [r.discrete_entropy for r in res])
    with pytest.raises(ValueError, match="n_samples"):
        SemanticEntropyConfig(n_samples=1)


# -- P(True) -------------------------------------------------------------------------------------------


def test_p_true_equals_direct_computation(tiny_llama):
    model, tok = tiny_llama
    eng = Engine(model, tok, threads=ThreadPolicy(1, 1))
    qs, ans = ["What is the capital of France?", "2+2?"], ["Paris", "5"]
    cfg = PTrueConfig(true_text="A", false_text="B")  # " A" is two byte tokens for the tiny tokenizer
    got = p_true(eng, qs, ans, cfg)
    a_id, b_id = tok("A", add_special_tokens=False)["input_ids"], tok("B", add_special_tokens=False)["input_ids"]
    assert len(a_id) == len(b_id) == 1
    for q, a, pt in zip(qs, ans, got, strict=True):
        ids = ptrue_prompt(tok, q, a, cfg)
        text = tok.decode(ids)
        assert f"Question: {q}\nProposed Answer: {a}\nIs the proposed answer:" in text
        assert text.endswith("The proposed answer is:")
        p = torch.softmax(hf_logits(model, ids)[-1], -1)
        assert pt == pytest.approx((p[a_id[0]] / (p[a_id[0]] + p[b_id[0]])).item(), abs=1e-5)
    gens = [Generation(q, [], [], a, "eos", [0.0], [0.0]) for q, a in zip(qs, ans, strict=True)]
    np.testing.assert_allclose(make_detector("p-true", engine=eng, config=cfg).score(gens), 1 - got)
    shots = PTrueConfig(shots=(("Q", "A", True),))
    assert tok.decode(ptrue_prompt(tok, "x", "y", shots)).count("The proposed answer is:") == 2
    with pytest.raises(ValueError, match="one-token"):
        p_true(eng, qs, ans)


# -- metrics ---------------------------------------------------------------------------------------------


def test_auroc_equals_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.integers(0, 2, 50)
        s = np.round(rng.normal(size=50) + y * rng.uniform(0, 2), 1)  # rounded: many ties
        assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        fpr, tpr = roc_curve(y, s)
        assert np.trapz(tpr, fpr) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auroc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert auroc([0, 1], [0.5, 0.5]) == 0.5
    with pytest.raises(ValueError, match="both"):
        auroc([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="finite"):
        auroc([0, 1], [0.1, float("nan")])


def test_aurac_hand_cases():
    # keep the lowest scores first: accuracies 1, 1, 2/3, 3/4
    frac, acc = rejection_accuracy_curve([1, 1, 0, 1], [0.1, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(frac, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(acc, [1, 1, 2 / 3, 3 / 4])
    assert aurac([1, 1, 0, 1], [0.1, 0.2, 0.3, 0.4]) == pytest.approx((1 + 1 + 2 / 3 + 3 / 4) / 4)
    # a tie at the front is broken at random in expectation: 0.5, 0.5, 2/3
    assert aurac([1, 0, 1], [0.1, 0.1, 0.3]) == pytest.approx((0.5 + 0.5 + 2 / 3) / 3)
    # an uninformative score gives the accuracy; the oracle rejects the wrong answers first
    assert aurac([1, 0, 0, 1, 1], [7] * 5) == pytest.approx(0.6)
    assert aurac_oracle([1, 0, 0, 1, 1]) == pytest.approx((1 + 1 + 1 + 3 / 4 + 3 / 5) / 5)
    assert aurac([1, 0, 0, 1, 1], [0, 1, 1, 0, 0]) == pytest.approx(aurac_oracle([1, 0, 0, 1, 1]))


def test_bootstrap_interval():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    s = rng.normal(size=200) + y
    ci = bootstrap_ci(auroc, y, s, n_boot=300, seed=0)
    assert ci.point == pytest.approx(auroc(y, s))
    assert ci.low < ci.point < ci.high and ci.n_valid == 300
    small = bootstrap_ci(auroc, y[:40], s[:40], n_boot=300, seed=0)
    assert (small.high - small.low) > (ci.high - ci.low)
    same = bootstrap_diff(auroc, y, s, s, n_boot=100)
    assert same.low == same.high == same.point == 0.0
    better = bootstrap_diff(auroc, y, s + 3 * y, s, n_boot=200)
    assert better.low > 0
    # resamples with one class are dropped, not fatal
    ci1 = bootstrap_ci(auroc, np.r_[1, np.zeros(5)], np.arange(6.0), n_boot=200)
    assert ci1.n_valid < 200


# -- probes ----------------------------------------------------------------------------------------------


def _synthetic(n=160, d=12, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    gens = []
    for i in range(n):
        noise = rng.normal(size=(3, d))
        noise[2, 0] += 4.0 * (2 * y[i] - 1)  # only layer 2 carries the label
        gens.append(Generation(f"q{i}", [], [], "", "eos", [0.0], [0.0], (0, 1, 2),
                               {"tbg": noise.astype(np.float32), "slt": rng.normal(size=(3, d)).astype(np.float32)}))
    return gens, y


def test_probe_separates_and_round_trips(tmp_path):
    gens, y = _synthetic()
    probe = train_probe(gens[:120], y[:120], ProbeConfig(Cs=(0.01, 1.0)))
    assert probe.layer == 2 and probe.position == "tbg"
    assert auroc(y[120:], probe.score(gens[120:])) > 0.95
    path = tmp_path / "probe.safetensors"
    probe.save(path)
    back = LinearProbe.load(path)
    np.testing.assert_array_equal(back.score(gens[120:]), probe.score(gens[120:]))
    assert (back.layer, back.C, back.target, back.meta["n_train"]) == (probe.layer, probe.C, probe.target, 120)
    det = make_detector("probe", path=path)
    np.testing.assert_array_equal(det.score(gens[:5]), probe.score(gens[:5]))
    # the slt states carry nothing
    assert auroc(y[120:], train_probe(gens[:120], y[:120], ProbeConfig(position="slt")).score(gens[120:])) < 0.8
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a saved probe"):
        LinearProbe.load(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="probe"):
        make_detector("probe")


def test_cross_validated_scores_do_not_leak():
    # pure noise with more dimensions than examples: a probe scored on its own training data looks perfect
    rng = np.random.default_rng(0)
    n, d = 60, 200
    y = rng.integers(0, 2, n)
    gens = [Generation(f"q{i}", [], [], "", "eos", [0.0], [0.0], (0,), {"tbg": rng.normal(size=(1, d))})
            for i in range(n)]
    cfg = ProbeConfig(Cs=(1.0,))
    in_sample = train_probe(gens, y, cfg).score(gens)
    assert auroc(y, in_sample) > 0.99
    oof, info = cross_validated_scores(gens, y, cfg, folds=5)
    assert not np.isnan(oof).any() and len(info) == 5
    assert abs(auroc(y, oof) - 0.5) < 0.2
    sig, _ = _synthetic()
    oof2, _ = cross_validated_scores(sig, _synthetic()[1], ProbeConfig(Cs=(0.1,)), folds=4)
    assert auroc(_synthetic()[1], oof2) > 0.95


def test_binarize_entropy():
    labels, thr = binarize_entropy([0.0, 0.1, 2.0, 0.2, 2.1])
    assert 0.2 < thr < 2.0 and labels.tolist() == [0, 0, 1, 0, 1]
    with pytest.raises(ValueError):
        binarize_entropy([1.0, 1.0])


# -- QA --------------------------------------------------------------------------------------------------


def test_normalisation_and_correctness_rule():
    assert normalize_answer("The Eiffel-Tower!") == "eiffel tower"
    assert normalize_answer("  Zürich,  Switzerland ") == "zurich switzerland"
    assert normalize_answer("Jane Austen's novel") == "jane austen s novel"
    assert is_correct("Jane Austen's Pride and Prejudice", ["Jane Austen"])
    assert is_correct("World War II ended in 1945.", ["1945"])
    assert is_correct("A spider has 8 legs", ["8", "eight"])
    assert not is_correct("18", ["8"])  # whole words only
    assert not is_correct("Parisian", ["Paris"])
    assert is_correct("Washington, D.C.", ["Washington"])
    assert is_correct_prefix("Paris, France", ["Paris"]) and not is_correct_prefix("It is Paris", ["Paris"])
    assert not is_correct("", ["Paris"])
    assert is_correct("Joules", ["joule"]) and is_correct("red blood cells", ["red blood cell"])
    assert not is_correct("Cs", ["C"]) and not is_correct("Os", ["O"])  # caesium, osmium
    assert is_correct_prefix("Joules per second", ["joule"]) and not is_correct_prefix("A", ["Au"])


def test_qa_checks(tmp_path):
    with pytest.raises(ValueError, match="occur in the question"):
        check_items([QAItem("x", "What is the capital of Mexico City's country?", ("Mexico",))])
    with pytest.raises(ValueError, match="duplicate"):
        check_items([QAItem("x", "Q one?", ("a1",)), QAItem("x", "Q two?", ("b1",))])
    with pytest.raises(ValueError, match="non-empty"):
        QAItem("x", "Q?", ("the",))
    p = tmp_path / "qa.jsonl"
    p.write_text(json.dumps({"id": "1", "question": "Q?"}) + "\n")
    with pytest.raises(ValueError, match="missing"):
        load_qa(p)


def test_closed_book_qa_file_matches_builder():
    import sys

    sys.path.insert(0, str(REPO / "experiments"))
    try:
        from build_closed_book_qa import build
    finally:
        sys.path.pop(0)
    items = load_qa(REPO / "experiments/data/closed_book_qa.jsonl")
    assert len(items) >= 300
    assert items == build()
    assert len({it.category for it in items}) >= 8
    assert all(it.correct(it.answers[0]) for it in items)


# -- registry --------------------------------------------------------------------------------------------


def test_registry_names_and_unknown_name(tiny_llama):
    assert detector_names() == ["token-logprob", "token-entropy", "semantic-entropy", "semantic-entropy-discrete",
                                "p-true", "probe"]
    with pytest.raises(UnknownNameError, match="semantic-entropy") as e:
        make_detector("semantic_entropy")
    assert "Known detectors" in str(e.value) and "token-logprob" in str(e.value)
    with pytest.raises(UnknownNameError, match="exact-match"):
        make_judge("exact")
    with pytest.raises(ValueError, match="reduce"):
        make_detector("token-entropy", reduce="median")


@pytest.mark.slow
@pytest.mark.realmodel
def test_smollm2_answers_and_scores(smollm2):
    model, tok = smollm2
    torch.set_num_threads(1)
    eng = Engine(model, tok, threads=ThreadPolicy(1, 1))
    gens = generate_answers(eng, ["What is the capital of France?", "What is the chemical symbol for gold?"])
    assert is_correct(gens[0].text, ["Paris"]) and is_correct(gens[1].text, ["Au"])
    assert gens[0].features["tbg"].shape == (30, 576)
    assert (make_detector("token-logprob").score(gens) < 1.0).all()
    assert (p_true(eng, ["What is the capital of France?"], ["Paris"]) > 0).all()


# -- known answers on toy models -----------------------------------------------------------------------------


def test_uniform_model_has_maximal_entropy():
    """A model whose LM head is zero puts equal mass on every token: each step's entropy is log(V) and each
    token's log-probability -log(V)."""
    from workbench.models.tiny import build_tiny

    model, tok = build_tiny("llama")
    head = model.get_output_embeddings()
    with torch.no_grad():
        if head.weight is model.get_input_embeddings().weight:  # tied: untie, so only the head goes flat
            head.weight = torch.nn.Parameter(head.weight.detach().clone())
        head.weight.zero_()
    V = head.weight.shape[0]
    eng = Engine(model, tok, threads=ThreadPolicy(1, 1))
    gens = generate_answers(eng, QUESTIONS[:2], CFG)
    for g in gens:
        np.testing.assert_allclose(g.token_entropies, np.log(V), rtol=1e-5)
        np.testing.assert_allclose(g.token_logprobs, -np.log(V), rtol=1e-5)
    np.testing.assert_allclose(make_detector("token-entropy").score(gens), np.log(V), rtol=1e-5)


def test_identical_samples_have_zero_semantic_entropy():
    answers = ["Paris"] * 6
    ids = cluster_answers("What is the capital of France?", answers, make_judge("exact-match"))
    assert ids == [0] * 6
    assert semantic_entropy([-0.3, -1.2, -0.7, -2.0, -0.1, -0.9], ids) == pytest.approx(0.0, abs=1e-12)
    assert discrete_semantic_entropy(ids) == pytest.approx(0.0, abs=1e-12)
    # and two equally likely clusters: log 2
    assert semantic_entropy([-1.0, -1.0], [0, 1]) == pytest.approx(np.log(2))


def test_auroc_equals_the_pairwise_count():
    """AUROC = P(score of a hallucination > score of a right answer) + P(equal) / 2, counted over every pair."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, size=40)
    s = np.round(rng.normal(size=40) + 0.8 * y, 1)  # rounded: ties
    pos, neg = s[y == 1], s[y == 0]
    pairs = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert auroc(y, s) == pytest.approx(pairs, abs=1e-12)
