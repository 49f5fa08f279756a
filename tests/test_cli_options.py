"""The CLI's generation options, batch input, JSON output, warnings, errors and clean Ctrl-C (tiny model)."""

import builtins
import io
import json
import logging

import pytest

import workbench
from workbench.cli import main
from workbench.engine import Engine, GenerationConfig, SamplingParams

TINY = ["-m", "tiny-llama", "--raw"]


@pytest.fixture(scope="module")
def tiny():
    model, tok = workbench.load("tiny-llama")
    return model, tok


def greedy(tiny, prompts, n=8, **sampling):
    model, tok = tiny
    cfg = GenerationConfig(max_new_tokens=n, sampling=SamplingParams(temperature=0.0, **sampling))
    return Engine(model, tok).generate([tok(p)["input_ids"] for p in prompts], cfg)


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"daert {workbench.__version__}"


def test_json_batch_from_file(capsys, tmp_path, tiny):
    f = tmp_path / "prompts.txt"
    f.write_text("hello there\n\nthe sea is\n")  # blank lines are skipped
    assert main(["generate", *TINY, "--max-new-tokens", "8", "--json", "--file", str(f)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    ref = greedy(tiny, ["hello there", "the sea is"])
    assert [r["prompt"] for r in rows] == ["hello there", "the sea is"]
    assert [r["token_ids"] for r in rows] == [r.token_ids for r in ref]
    assert [r["text"] for r in rows] == [r.text for r in ref]
    assert all(r["finish_reason"] in ("eos", "length") and r["tok_s"] > 0 for r in rows)


def test_prompts_from_stdin(capsys, monkeypatch, tiny):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\nthe sea is\n"))
    assert main(["generate", *TINY, "--max-new-tokens", "6", "-"]) == 0
    assert capsys.readouterr().out.splitlines() == [r.text for r in greedy(tiny, ["hello there", "the sea is"], 6)]


def test_penalties_reach_the_engine(capsys, tiny):
    assert main(["generate", *TINY, "--max-new-tokens", "12", "--json", "--repetition-penalty", "1.8",
                 "hello there"]) == 0
    got = json.loads(capsys.readouterr().out)["token_ids"]
    assert got == greedy(tiny, ["hello there"], 12, repetition_penalty=1.8)[0].token_ids
    assert got != greedy(tiny, ["hello there"], 12)[0].token_ids


def test_stop_string(capsys, tiny):
    text = greedy(tiny, ["hello there"], 16)[0].text
    stop = text[4:6]
    assert main(["generate", *TINY, "--max-new-tokens", "16", "--json", "--stop", stop, "hello there"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["finish_reason"] == "stop" and row["text"] == text[: text.index(stop)]


def test_strategy_speculative_equals_greedy(capsys, tiny):
    assert main(["generate", *TINY, "--max-new-tokens", "10", "--json", "--strategy", "speculative",
                 "abcabcabcabc"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == greedy(tiny, ["abcabcabcabc"], 10)[0].token_ids


def test_threads_option(capsys, tiny):
    assert main(["generate", *TINY, "--max-new-tokens", "6", "--threads", "1", "hello"]) == 0
    assert capsys.readouterr().out.strip() == greedy(tiny, ["hello"], 6)[0].text.strip()
    assert main(["generate", *TINY, "--threads", "0", "hello"]) == 2


def test_ineffective_sampling_flags_warn(capsys):
    assert main(["generate", *TINY, "--max-new-tokens", "4", "--top-p", "0.5", "--seed", "3", "hello"]) == 0
    err = capsys.readouterr().err
    assert "--top-p has no effect with greedy" in err and "--seed has no effect" in err
    assert main(["generate", *TINY, "--max-new-tokens", "4", "--beams", "2", "--temperature", "0.7", "hi"]) == 0
    assert "--temperature has no effect with beam search" in capsys.readouterr().err
    assert main(["generate", *TINY, "--max-new-tokens", "4", "--temperature", "0.7", "--top-p", "0.5", "hi"]) == 0
    assert "no effect" not in capsys.readouterr().err  # a real sampling run: nothing to warn about


@pytest.mark.parametrize("argv, msg", [
    (["generate", *TINY, "--backend", "fast", "hi"], "invalid choice: 'fast'"),
    (["generate", *TINY, "--strategy", "mcts", "hi"], "invalid choice: 'mcts'"),
    (["generate", *TINY], "no prompt"),
    (["generate", *TINY, "--file", "missing.txt"], "no such file"),
    (["generate", *TINY, "--strategy", "speculative", "--repetition-penalty", "1.2", "hi"], "penalties"),
    (["generate", *TINY, "--strategy", "beam", "--regex", "[0-9]", "hi"], "--regex"),
    (["generate", *TINY, "--weights", "q3", "hi"], "invalid choice: 'q3'"),
    (["generate", *TINY, "--weights", "int8", "--weights-gguf", "x.gguf", "hi"], "weights='q4'"),
    (["generate", *TINY, "--weights", "bf16", "--backend", "hf", "hi"], "packed-backend format"),
    (["generate", *TINY, "--weights", "fp16", "--activations", "q8", "hi"], "activations='q8'"),
    (["generate", *TINY, "--activations", "q4", "hi"], "invalid choice: 'q4'"),
    (["generate", *TINY, "--prefill", "mkl", "hi"], "invalid choice: 'mkl'"),
    (["generate", *TINY, "--prefill", "onednn", "--backend", "hf", "hi"], "packed backend's GEMM"),
    (["generate", *TINY, "--graphs", "cuda", "--backend", "hf", "hi"], "model is on cpu"),
    (["generate", *TINY, "--graphs", "eager", "hi"], "pass backend='hf'"),
    (["generate", *TINY, "--graphs", "eager", "--backend", "hf", "--strategy", "beam", "hi"], "strategy 'beam'"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, msg):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1


def test_ctrl_c_in_chat_ends_cleanly(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin.isatty", lambda: True, raising=False)

    def interrupt(prompt=""):
        raise KeyboardInterrupt
    monkeypatch.setattr(builtins, "input", interrupt)
    assert main(["chat", "-m", "tiny-llama", "--max-new-tokens", "4"]) == 130
    assert "Traceback" not in capsys.readouterr().err


def test_chat_reuses_one_engine_across_turns(monkeypatch):
    from workbench.chat import Chat
    from workbench.engine.backends import PackedLlamaBackend

    packs = []
    original = PackedLlamaBackend._pack
    monkeypatch.setattr(PackedLlamaBackend, "_pack", lambda self: (packs.append(1), original(self))[1])
    model, tok = workbench.load("tiny-llama")
    chat = Chat(Engine(model, tok), system="be brief")
    first = chat.reply("hi", max_new_tokens=4)
    chat.reply("again", max_new_tokens=4)
    assert len(packs) == 1  # packed once, not once per turn
    assert [m["role"] for m in chat.history] == ["system", "user", "assistant", "user", "assistant"]
    assert chat.history[2]["content"] == first.strip()


def test_failed_chat_turn_leaves_no_trace():
    from workbench.chat import Chat

    model, tok = workbench.load("tiny-llama")
    chat = Chat(Engine(model, tok))
    with pytest.raises(ValueError):
        chat.reply("hi", max_new_tokens=0)
    assert chat.history == []


def test_first_native_build_says_what_it_does(monkeypatch, tmp_path, caplog):
    from workbench.engine import native

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("DAERT_NO_NATIVE", raising=False)
    monkeypatch.setattr("torch.utils.cpp_extension.load", lambda **kw: object())
    monkeypatch.setattr(native, "_loaded", {})
    with caplog.at_level(logging.INFO, logger="workbench.engine.native"):
        assert native.load("packed_llama") is not None
    assert "compiling the C++ helper 'packed_llama'" in caplog.text


def test_graphs_option(capsys, tiny):
    from workbench.cli import GRAPH_MODES
    from workbench.engine.graphs import MODES

    assert GRAPH_MODES == MODES
    model, tok = tiny
    assert main(["generate", *TINY, "--max-new-tokens", "6", "--backend", "hf", "--graphs", "eager", "--json",
                 "hello"]) == 0
    got = json.loads(capsys.readouterr().out)
    cfg = GenerationConfig(max_new_tokens=6, sampling=SamplingParams(temperature=0.0))
    assert got["text"] == Engine(model, tok, backend="hf").generate([tok("hello")["input_ids"]], cfg)[0].text


def test_weights_option(capsys, tiny):
    from workbench.cli import ACTIVATION_FORMATS, PREFILL_GEMMS, WEIGHT_FORMATS
    from workbench.engine.weights import ACTIVATIONS, FORMATS, PREFILLS

    assert WEIGHT_FORMATS == FORMATS and ACTIVATION_FORMATS == ACTIVATIONS and PREFILL_GEMMS == PREFILLS
    model, tok = tiny
    cfg = GenerationConfig(max_new_tokens=6, sampling=SamplingParams(temperature=0.0))
    for fmt, act in (("q4", "fp32"), ("q4", "q8"), ("fp32", "fp32")):
        assert main(["generate", *TINY, "--max-new-tokens", "6", "--weights", fmt, "--activations", act, "--json",
                     "hello"]) == 0
        got = json.loads(capsys.readouterr().out)
        want = Engine(model, tok, weights=fmt, activations=act).generate([tok("hello")["input_ids"]], cfg)[0]
        assert got["text"] == want.text
