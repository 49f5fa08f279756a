import io
import json

import pytest
import torch
from corpora import require

from workbench.chat import generate, prompt_ids
from workbench.cli import main
from workbench.data.windows import token_windows
from workbench.engine import Engine
from workbench.eval.perplexity import perplexity


def test_models_list_json(capsys):
    assert main(["models", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = [r["name"] for r in rows]
    assert names[:2] == ["smollm2-135m-instruct", "gemma3-270m"]
    assert {r["kind"] for r in rows} == {"gguf@pypi", "tiny-random"}


def test_generate_is_hf_greedy(capsys, tiny_llama):
    model, tok = tiny_llama
    assert main(["generate", "-m", "tiny-llama", "--max-new-tokens", "12", "--raw", "hello there"]) == 0
    out = capsys.readouterr().out
    ids = tok("hello there")["input_ids"]
    ref = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    expected = tok.decode(ref[0, len(ids):], skip_special_tokens=True)
    assert out.rstrip("\n") == expected


def test_generate_chat_template_path(tiny_llama):
    model, tok = tiny_llama
    ids = prompt_ids(tok, [{"role": "user", "content": "hi"}])
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    engine = Engine(model, tok)
    a = generate(engine, ids, max_new_tokens=5, temperature=0.8, seed=3)
    b = generate(engine, ids, max_new_tokens=5, temperature=0.8, seed=3, on_text=lambda t: None)
    assert (a.text, a.token_ids) == (b.text, b.token_ids)  # seeded sampling is reproducible, streamed or not


@pytest.mark.parametrize("kwargs,msg", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
])
def test_generate_bad_args(tiny_llama, kwargs, msg):
    model, tok = tiny_llama
    with pytest.raises(ValueError, match=msg):
        generate(Engine(model, tok), [1, 2, 3], **kwargs)


def test_prompt_checks(tiny_llama):
    _, tok = tiny_llama
    with pytest.raises(ValueError, match="empty prompt"):
        prompt_ids(tok, [{"role": "user", "content": ""}])
    with pytest.raises(ValueError, match="bad message"):
        prompt_ids(tok, [{"role": "robot", "content": "x"}])


def test_chat_one_shot(capsys):
    assert main(["chat", "-m", "tiny-llama", "--max-new-tokens", "4", "--message", "hi", "--message", "again"]) == 0
    out = capsys.readouterr().out
    assert out.count("you> ") == 2 and out.count("assistant> ") == 2


def test_chat_from_stdin_needs_text(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("\n\n"))
    assert main(["chat", "-m", "tiny-llama"]) == 2
    assert "no message" in capsys.readouterr().err


def test_ppl_command(tmp_path, capsys, tiny_llama):
    require("gpl-3")
    out_json = tmp_path / "r" / "ppl.json"
    rc = main(["ppl", "-m", "tiny-llama", "--corpus", "gpl-3", "--window", "64", "--max-windows", "3",
               "--json-out", str(out_json)])
    assert rc == 0
    got = json.loads(out_json.read_text())
    ref = perplexity(tiny_llama[0], token_windows(tiny_llama[1], "gpl-3", 64, max_windows=3), progress=False)
    assert got["ppl"] == pytest.approx(ref.ppl, rel=1e-5)
    assert (got["n_windows"], got["window"], got["corpus"]) == (3, 64, "gpl-3")
    assert f"perplexity {ref.ppl:.3f}" in capsys.readouterr().out


@pytest.mark.parametrize("argv,msg", [
    (["generate", "-m", "SmolLM2", "x"], "unknown model 'SmolLM2'"),
    (["generate", "-m", "tiny-llama", "  "], "empty prompt"),
    (["ppl", "-m", "tiny-llama", "--corpus", "nope"], "unknown corpus 'nope'"),
    (["models", "pull", "tiny-llama"], "nothing to pull"),
    (["models", "pull", "gemma"], "unknown model 'gemma'"),
])
def test_bad_input_exit_2(argv, msg, capsys):
    assert main(argv) == 2
    assert msg in capsys.readouterr().err


def test_corpora_list(capsys):
    assert main(["corpora", "list"]) == 0
    out = capsys.readouterr().out
    assert "gcide" in out and "dict-gcide" in out


def test_generate_regex_and_schema(capsys, tmp_path):
    import json
    import re

    assert main(["generate", "-m", "tiny-llama", "--raw", "--regex", "[0-9]{3}-[a-z]{2}", "--temperature", "1",
                 "--seed", "3", "hi"]) == 0
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", capsys.readouterr().out.strip())
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}))
    assert main(["generate", "-m", "tiny-llama", "--raw", "--json-schema", str(schema), "--temperature", "1",
                 "--seed", "1", "--max-new-tokens", "64", "hi"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out)["n"], int)
    assert main(["generate", "-m", "tiny-llama", "--raw", "--json-schema", "nope.json", "hi"]) == 2
    assert "neither a JSON object nor a file" in capsys.readouterr().err


def test_generate_beam(capsys, tiny_llama):
    from workbench.engine import BeamConfig, Engine

    model, tok = tiny_llama
    assert main(["generate", "-m", "tiny-llama", "--raw", "--beams", "3", "--max-new-tokens", "8", "hello"]) == 0
    [ref] = Engine(model, tok).generate(["hello"], BeamConfig(num_beams=3, max_new_tokens=8), strategy="beam")
    assert capsys.readouterr().out == ref.text + "\n"
