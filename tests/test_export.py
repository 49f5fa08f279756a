"""Exports: HF folders and llama GGUFs round-trip through transformers (and llama.cpp when installed).

"Exact" here means: the reloaded weights equal, bit for bit, what the format stores (the model's own weights
for HF and GGUF F32; rounded to fp16 / Q8_0 blocks for F16 / Q8_0, see ``reference_state_dict``), so the
reloaded model's float32 logits equal those of the model holding the stored weights bit for bit, and the
greedy tokens follow.
"""

import argparse
import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from workbench.export import gguf as gguf_export
from workbench.export import reference_state_dict, save_gguf, save_hf
from workbench.export.cli import ExportTargets, add_parser, run
from workbench.models.tiny import build_tiny

TEXTS = ("Hello world, plain ASCII.", "café naïve Ærøskøbing façade", "emoji 🙂🚀 and 日本語", "  spaces\n\ttabs")
DTYPES = ("f32", "f16", "q8_0")


@pytest.fixture
def tiny():
    """A fresh tiny Llama per test (tests edit it in place)."""
    return build_tiny("llama")


def _tied_tiny(seed=1):
    from transformers import AutoModelForCausalLM, LlamaConfig

    model, tok = build_tiny("llama")
    cfg = LlamaConfig(**{**model.config.to_dict(), "tie_word_embeddings": True})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tied = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    return tied, tok


def _ids(tok, text="The quick brown fox jumps over the lazy dog"):
    return torch.tensor([tok(text)["input_ids"]])


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _greedy(model, tok, ids, n=12):
    from transformers import GenerationConfig

    cfg = GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        return model.generate(ids, generation_config=cfg)[0, ids.shape[1]:].tolist()


def _load_gguf(path, tokenizer=True):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, (AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name) if tokenizer else None)


def _load_hf(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def _reference(model, dtype):
    ref = copy.deepcopy(model)
    ref.load_state_dict(reference_state_dict(model, dtype))
    return ref


def _same_ids(tok_a, tok_b):
    chat = tok_a.apply_chat_template([{"role": "user", "content": "Qu'est-ce que c'est ? 🙂"}], tokenize=False,
                                     add_generation_prompt=True)
    for text in (*TEXTS, chat):
        assert tok_a(text)["input_ids"] == tok_b(text)["input_ids"], text
    assert tok_b.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        tok_a.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def _assert_state_equal(model, expected: dict):
    got = model.state_dict()
    for k, v in expected.items():
        assert torch.equal(got[k], v.to(got[k].dtype)), k


# ------------------------------------------------------------------------------------------------ HF folder


def test_hf_roundtrip_exact(tiny, tmp_path):
    model, tok = tiny
    out = save_hf(model, tok, tmp_path / "hf")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja"} <= names
    m2, t2 = _load_hf(out)
    ids = _ids(tok)
    assert torch.equal(_logits(model, ids), _logits(m2, ids))
    _same_ids(tok, t2)
    assert m2.generation_config.eos_token_id == tok.eos_token_id


def test_hf_refuses_nonempty_dir_and_overwrites_only_when_complete(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    target = tmp_path / "hf"
    target.mkdir()
    save_hf(model, tok, target)  # an empty folder is fine
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_hf(model, tok, target)
    assert (target / "notes.txt").read_text() == "keep me"

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(tok), "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_hf(model, tok, target, overwrite=True)
    assert (target / "notes.txt").read_text() == "keep me"  # the old folder survives a failed overwrite
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # and no staging folder is left behind
    monkeypatch.undo()
    save_hf(model, tok, target, overwrite=True)
    assert not (target / "notes.txt").exists()


def test_hf_dtype_casts_the_saved_weights_only(tiny, tmp_path):
    model, tok = tiny
    out = save_hf(model, tok, tmp_path / "hf", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert model.dtype == torch.float32  # the model in memory is untouched
    from transformers import AutoModelForCausalLM

    m2 = AutoModelForCausalLM.from_pretrained(out)
    assert m2.dtype == torch.bfloat16
    _assert_state_equal(m2, {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    with pytest.raises(ValueError, match="float32"):
        save_hf(model, tok, tmp_path / "x", dtype="fp8")


def test_hf_keeps_an_edit_that_unties_the_embeddings(tmp_path):
    model, tok = _tied_tiny()
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.clone())
        model.lm_head.weight[65] += 0.5
    m2, _ = _load_hf(save_hf(model, tok, tmp_path / "hf"))
    ids = _ids(tok)
    assert torch.equal(_logits(model, ids), _logits(m2, ids))
    assert model.config.tie_word_embeddings  # the caller's config is left as it was


# ------------------------------------------------------------------------------------------------ GGUF, tiny


@pytest.mark.parametrize("dtype", DTYPES)
def test_gguf_roundtrip_exact_against_stored_weights(tiny, tmp_path, dtype):
    model, tok = tiny
    m2, t2 = _load_gguf(save_gguf(model, tok, tmp_path / f"tiny-{dtype}.gguf", dtype=dtype))
    ref = _reference(model, dtype)
    _assert_state_equal(m2, ref.state_dict())  # bit for bit, after the Q/K un-permutation
    ids = _ids(tok)
    assert torch.equal(_logits(ref, ids), _logits(m2, ids))
    assert _greedy(ref, tok, ids) == _greedy(m2, tok, ids)
    _same_ids(tok, t2)
    orig = model.state_dict()
    if dtype == "f32":  # F32 stores the model itself
        _assert_state_equal(m2, orig)
        assert torch.equal(_logits(model, ids), _logits(m2, ids))
    else:  # rounded, and by the amount the format allows
        diffs = {k: (ref.state_dict()[k] - v).abs().max().item() for k, v in orig.items()}
        assert max(diffs.values()) > 0
        if dtype == "f16":  # "the model cast to fp16 and back" for matrices; norms stay F32
            for k, v in orig.items():
                want = v.half().float() if v.dim() == 2 else v
                assert torch.equal(ref.state_dict()[k], want), k


def test_gguf_f16_greedy_matches_the_fp32_model(tiny, tmp_path):
    model, tok = tiny
    m2, _ = _load_gguf(save_gguf(model, tok, tmp_path / "tiny.gguf", dtype="f16"))
    for text in ("hello", "The capital of France is", "1, 2, 3,"):
        ids = _ids(tok, text)
        assert _greedy(model, tok, ids) == _greedy(m2, tok, ids), text
        torch.testing.assert_close(_logits(m2, ids), _logits(model, ids), rtol=0, atol=2e-2)


def test_gguf_without_qk_permutation_breaks(tiny, tmp_path, monkeypatch):
    """Negative control: the round trip depends on the Q/K permutation."""
    model, tok = tiny
    monkeypatch.setattr(gguf_export, "llama_qk_permute", lambda w, n_heads: w)
    m2, _ = _load_gguf(save_gguf(model, tok, tmp_path / "wrong.gguf", dtype="f32"))
    ids = _ids(tok)
    assert (_logits(model, ids) - _logits(m2, ids)).abs().max() > 1e-3


def test_qk_permute_is_a_per_head_reordering():
    w = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)  # 2 heads of 8 rows
    p = gguf_export.llama_qk_permute(w, 2)
    rows = [int(r[0]) // 3 for r in p]
    assert rows == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


def test_gguf_carries_an_in_place_edit(tiny, tmp_path):
    model, tok = tiny
    ids = _ids(tok)
    before = _logits(model, ids)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[:, :8] += 0.3
    after = _logits(model, ids)
    assert (after - before).abs().max() > 1e-2
    for m2 in (_load_gguf(save_gguf(model, tok, tmp_path / "edited.gguf", dtype="f32"))[0],
               _load_hf(save_hf(model, tok, tmp_path / "edited-hf"))[0]):
        got = _logits(m2, ids)
        assert torch.equal(got, after)
        assert not torch.allclose(got, before)


def test_gguf_metadata(tiny, tmp_path):
    from gguf import GGUFReader

    model, tok = tiny
    cfg = model.config
    r = GGUFReader(save_gguf(model, tok, tmp_path / "tiny.gguf", dtype="q8_0", name="tiny-test"))

    def field(key):
        f = r.fields[key]
        return f.contents()

    assert field("general.architecture") == "llama"
    assert field("general.name") == "tiny-test"
    assert field("general.file_type") == 7  # MOSTLY_Q8_0
    expected = {
        "llama.context_length": cfg.max_position_embeddings, "llama.embedding_length": cfg.hidden_size,
        "llama.block_count": cfg.num_hidden_layers, "llama.feed_forward_length": cfg.intermediate_size,
        "llama.attention.head_count": cfg.num_attention_heads,
        "llama.attention.head_count_kv": cfg.num_key_value_heads,
        "llama.rope.dimension_count": cfg.head_dim, "llama.vocab_size": len(tok),
        "tokenizer.ggml.bos_token_id": tok.bos_token_id, "tokenizer.ggml.eos_token_id": tok.eos_token_id,
        "tokenizer.ggml.padding_token_id": tok.pad_token_id, "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2", "tokenizer.chat_template": tok.chat_template,
    }
    for key, value in expected.items():
        assert field(key) == value, key
    assert field("llama.rope.freq_base") == pytest.approx(cfg.rope_parameters["rope_theta"])
    assert field("llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.rms_norm_eps, rel=1e-6)
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == len(tok)
    assert tokens[tok.eos_token_id] == "<|im_end|>" and types[tok.eos_token_id] == 3  # CONTROL
    assert types[65] == 1 and tokens[65] == "A"  # NORMAL
    kinds = {t.name: t.tensor_type.name for t in r.tensors}
    assert kinds["blk.0.attn_norm.weight"] == "F32" and kinds["output_norm.weight"] == "F32"
    assert kinds["blk.0.attn_q.weight"] == "Q8_0" and kinds["token_embd.weight"] == "Q8_0"
    assert "output.weight" in kinds  # untied
    assert len(kinds) == 2 + 1 + 9 * cfg.num_hidden_layers


def test_gguf_tied_embeddings(tmp_path):
    model, tok = _tied_tiny()
    path = save_gguf(model, tok, tmp_path / "tied.gguf", dtype="f32")
    from gguf import GGUFReader

    assert "output.weight" not in {t.name for t in GGUFReader(path).tensors}
    m2, _ = _load_gguf(path)
    assert m2.config.tie_word_embeddings
    ids = _ids(tok)
    assert torch.equal(_logits(model, ids), _logits(m2, ids))
    with torch.no_grad():  # an edit that unties them is kept: output.weight is written, the reader unties
        model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.clone())
        model.lm_head.weight[65] += 0.5
    m3, _ = _load_gguf(save_gguf(model, tok, tmp_path / "untied.gguf", dtype="f32"))
    assert not m3.config.tie_word_embeddings
    assert torch.equal(_logits(model, ids), _logits(m3, ids))


def _with_rope(params):
    from transformers import AutoModelForCausalLM, LlamaConfig

    model, tok = build_tiny("llama")
    cfg = LlamaConfig(**{**model.config.to_dict(), "rope_parameters": {"rope_theta": 10000.0, **params}})
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval(), tok


def test_gguf_rope_scaling_metadata(tmp_path):
    from gguf import GGUFReader

    model, tok = _with_rope({"rope_type": "linear", "factor": 4.0})
    f = GGUFReader(save_gguf(model, tok, tmp_path / "linear.gguf", dtype="f32")).fields
    assert f["llama.rope.scaling.type"].contents() == "linear"
    assert f["llama.rope.scaling.factor"].contents() == 4.0

    model, tok = _with_rope({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 256,
                             "beta_fast": 32.0, "beta_slow": 1.0})
    f = GGUFReader(save_gguf(model, tok, tmp_path / "yarn.gguf", dtype="f32")).fields
    assert f["llama.rope.scaling.type"].contents() == "yarn"
    assert f["llama.rope.scaling.original_context_length"].contents() == 256
    assert f["llama.rope.scaling.yarn_beta_fast"].contents() == 32.0

    model, tok = _with_rope({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    path = save_gguf(model, tok, tmp_path / "llama3.gguf", dtype="f32")
    [freqs] = [t for t in GGUFReader(path).tensors if t.name == "rope_freqs.weight"]
    hd = model.config.head_dim
    plain = 1.0 / 10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    got = torch.from_numpy(np.array(freqs.data, dtype=np.float64))
    torch.testing.assert_close(got, (plain / model.model.rotary_emb.inv_freq.double()).float().double())
    assert got.max() == pytest.approx(8.0) and got.min() == pytest.approx(1.0)
    # transformers' llama GGUF reader ignores RoPE scaling (llama.cpp reads it): documented, and pinned here
    m2, _ = _load_gguf(path)
    assert m2.config.rope_parameters["rope_type"] == "default"


def test_gguf_refusals(tmp_path):
    from workbench.export import ExportRefused

    model, tok = build_tiny("llama")
    with pytest.raises(ValueError, match=r"\['f32', 'f16', 'q8_0'\]"):
        save_gguf(model, tok, tmp_path / "x.gguf", dtype="Q8_0")
    gpt2, gtok = build_tiny("gpt2")
    with pytest.raises(ExportRefused, match="model_type 'gpt2' is refused: GPT-2 uses LayerNorm"):
        save_gguf(gpt2, gtok, tmp_path / "x.gguf")
    biased = copy.deepcopy(model)
    biased.config.attention_bias = True
    with pytest.raises(ExportRefused, match="attention_bias"):
        save_gguf(biased, tok, tmp_path / "x.gguf")
    from workbench.context import RopeScaling, apply_rope_scaling

    with apply_rope_scaling(model, RopeScaling("linear", factor=2.0)), \
            pytest.raises(ExportRefused, match="workbench.context RoPE scaling"):
        save_gguf(model, tok, tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


def test_gguf_write_is_atomic(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    path = save_gguf(model, tok, tmp_path / "m.gguf", dtype="f32")
    data = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_gguf(model, tok, path)
    calls = []
    encode = gguf_export._encode

    def failing(arr, qtype):  # fails after a few tensors are on disk
        calls.append(1)
        if len(calls) > 5:
            raise OSError("disk full")
        return encode(arr, qtype)

    monkeypatch.setattr(gguf_export, "_encode", failing)
    with pytest.raises(OSError, match="disk full"):
        save_gguf(model, tok, path, overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        save_gguf(model, tok, tmp_path / "new.gguf")
    assert path.read_bytes() == data  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no partial file left


# ------------------------------------------------------------------------------------------------ CLI, imports


def test_cli_export(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", "-m", "tiny-llama", "--hf", str(tmp_path / "hf"),
                              "--gguf", str(tmp_path / "t.gguf"), "--gguf-dtype", "q8_0"])
    assert run(args) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "hf"), str(tmp_path / "t.gguf")]
    assert (tmp_path / "hf" / "model.safetensors").is_file() and (tmp_path / "t.gguf").is_file()
    with pytest.raises(ValueError, match="--overwrite"):  # exit status 2 in daert's main, not a traceback
        run(parser.parse_args(["export", "-m", "tiny-llama", "--hf", str(tmp_path / "hf")]))
    with pytest.raises(ValueError, match="nothing to write"):
        run(parser.parse_args(["export", "-m", "tiny-llama"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "--gguf", "x.gguf", "--gguf-dtype", "q4"])
    with pytest.raises(ValueError, match="q8_0"):
        ExportTargets(gguf=tmp_path / "x.gguf", gguf_dtype="q4")


def test_export_package_import_is_lazy():
    code = ("import sys, workbench.export as e; "
            "print(any(m.startswith('workbench.export.') for m in sys.modules), 'gguf' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# ------------------------------------------------------------------------------------------------ SmolLM2

FACTS = ("The capital of France is", "The largest planet in the solar system is",
         "Water is made of hydrogen and", "The author of Romeo and Juliet is")


@pytest.mark.realmodel
def test_smollm2_hf_roundtrip(smollm2, tmp_path):
    model, tok = smollm2
    m2, t2 = _load_hf(save_hf(model, tok, tmp_path / "smol"))
    ids = _ids(tok, FACTS[0])
    assert torch.equal(_logits(model, ids), _logits(m2, ids))
    _same_ids(tok, t2)


@pytest.fixture(scope="module")
def smollm2_ggufs(tmp_path_factory, _smollm2_session):
    model, tok = _smollm2_session
    d = tmp_path_factory.mktemp("smol-gguf")
    return {dt: save_gguf(model, tok, d / f"smollm2-{dt}.gguf", dtype=dt) for dt in DTYPES}


@pytest.mark.realmodel
@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_smollm2_gguf(smollm2, smollm2_ggufs, dtype):
    model, tok = smollm2
    m2, t2 = _load_gguf(smollm2_ggufs[dtype], tokenizer=dtype == "f32")  # the same tokenizer in every file
    if t2 is not None:
        _same_ids(tok, t2)
    ref = model if dtype == "f32" else _reference(model, dtype)
    prompts = [_ids(tok, p) for p in FACTS]
    assert torch.equal(_logits(ref, prompts[0]), _logits(m2, prompts[0]))  # bit for bit vs the stored weights
    for ids in prompts:
        want = _greedy(model, tok, ids, n=8)
        got = _greedy(m2, tok, ids, n=8)
        if dtype == "q8_0":  # quantized: the answer (first words) is the same
            assert tok.decode(got[:3]) == tok.decode(want[:3]), (tok.decode(got), tok.decode(want))
        else:
            assert got == want, (tok.decode(got), tok.decode(want))
    if dtype == "f32":
        torch.testing.assert_close(_logits(m2, prompts[1]), _logits(model, prompts[1]), rtol=1e-5, atol=1e-5)


@pytest.mark.realmodel
@pytest.mark.slow
def test_smollm2_gguf_in_llama_cpp(smollm2, smollm2_ggufs):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    model, tok = smollm2
    llm = llama_cpp.Llama(model_path=str(smollm2_ggufs["f32"]), n_ctx=256, verbose=False, logits_all=False)
    for prompt in FACTS[:2]:
        ids = _ids(tok, prompt)
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids[0].tolist()
        want = _greedy(model, tok, ids, n=6)
        out = llm(prompt, max_tokens=6, temperature=0.0, top_k=1)
        assert out["choices"][0]["text"].strip().startswith(tok.decode(want[:3]).strip())
