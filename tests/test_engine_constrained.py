"""Constrained decoding: every finished output matches its regex / parses under its JSON schema."""

import json
import re

import pytest

from workbench.engine import ConstraintError, Engine, GenerationConfig, JsonSchema, Regex, SamplingParams
from workbench.engine.constrained import token_bytes
from workbench.models.tiny import build_tiny

HOT = SamplingParams(temperature=1.5)  # flat distributions: the constraint, not the model, must keep outputs valid

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"enum": ["red", "green"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
}


@pytest.fixture(scope="module")
def engine():
    return Engine(*build_tiny("llama"))


def test_token_bytes_of_the_byte_tokenizer(engine):
    tok = engine.tokenizer
    table = token_bytes(tok)
    assert table[ord("A")] == b"A" and tok.eos_token_id not in table
    ids = tok("Héllo wörld, 42!", add_special_tokens=False)["input_ids"]
    assert b"".join(table[i] for i in ids).decode() == "Héllo wörld, 42!"


@pytest.mark.realmodel
def test_token_bytes_round_trip_smollm2(smollm2):
    _, big = smollm2
    table = token_bytes(big)
    ids = big("Héllo wörld, 42!")["input_ids"]
    assert b"".join(table[i] for i in ids).decode() == "Héllo wörld, 42!"
    assert not {big.eos_token_id, big.bos_token_id} & table.keys()


def test_mask_matches_automaton(engine):
    guide = engine.guide(Regex(r"(ab|cd)+"))
    for tok in [None, ord("a"), ord("b")]:
        if tok is not None:
            guide.advance(tok)
        assert set(guide.allowed().nonzero().flatten().tolist()) == set(guide.guide.get_tokens())


def test_regex_always_matches(engine):
    pattern = r"[0-9]{3}-[a-z]{2,4}( ok)?"
    cfgs = [GenerationConfig(max_new_tokens=40, sampling=HOT, seed=s, constraint=Regex(pattern)) for s in range(40)]
    results = engine.generate(["code:"] * len(cfgs), cfgs)
    assert all(r.finish_reason == "eos" for r in results)
    assert all(re.fullmatch(pattern, r.text) for r in results)
    assert len({r.text for r in results}) > 20  # sampling still varies inside the constraint


def test_json_schema_always_parses(engine):
    cfgs = [GenerationConfig(max_new_tokens=300, sampling=HOT, seed=s, constraint=JsonSchema(SCHEMA))
            for s in range(25)]
    results = engine.generate(["json:"] * len(cfgs), cfgs)
    for r in results:
        assert r.finish_reason == "eos", r.text
        doc = json.loads(r.text)
        assert set(doc) == {"name", "age", "tags"} and isinstance(doc["age"], int)
        assert len(doc["name"]) <= 8 and set(doc["tags"]) <= {"red", "green"} and len(doc["tags"]) <= 3


def test_greedy_constrained_and_free_rows_share_a_batch(engine):
    free = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    digits = GenerationConfig(max_new_tokens=12, constraint=Regex(r"[0-9]{4}"))
    alone = engine.generate(["hello"], free)[0]
    mixed = engine.generate(["hello", "hello"], [free, digits])
    assert mixed[0].token_ids == alone.token_ids
    assert re.fullmatch(r"[0-9]{4}", mixed[1].text) and mixed[1].finish_reason == "eos"


def test_length_cut_is_reported(engine):
    [r] = engine.generate(["x"], GenerationConfig(max_new_tokens=3, constraint=Regex(r"[a-z]{10}")))
    assert r.finish_reason == "length" and len(r.text) == 3


@pytest.mark.parametrize("make,err,msg", [
    (lambda: Regex(""), ConstraintError, "non-empty"),
    (lambda: JsonSchema("{not json").to_regex(), ConstraintError, "JSON schema"),
    (lambda: GenerationConfig(constraint="[0-9]+"), ValueError, "Regex or JsonSchema"),
    (lambda: GenerationConfig(constraint=Regex("a"), ignore_eos=True), ValueError, "ignore_eos"),
])
def test_bad_constraints(make, err, msg):
    with pytest.raises(err, match=msg):
        make()


def test_uncompilable_regex(engine):
    with pytest.raises(ConstraintError, match="cannot compile"):
        engine.generate(["x"], GenerationConfig(constraint=Regex("(unclosed")))


@pytest.mark.realmodel
def test_smollm2_json_answer(smollm2):
    from workbench.chat import prompt_ids

    model, tok = smollm2
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                "country": {"type": "string", "maxLength": 30}},
              "required": ["city", "country"]}
    ids = prompt_ids(tok, [{"role": "user", "content": "What is the capital of France? Answer in JSON."}])
    [r] = Engine(model, tok).generate([ids], GenerationConfig(max_new_tokens=40, constraint=JsonSchema(schema)))
    doc = json.loads(r.text)
    assert r.finish_reason == "eos" and doc["city"] == "Paris"
