import pytest
import torch

import workbench
from workbench.errors import ModelUnavailableError, UnknownNameError
from workbench.models.registry import REGISTRY, PypiGGUFSource, get_spec


def test_registry_has_card_models():
    assert {"smollm2-135m-instruct", "gemma3-270m", "tiny-llama", "tiny-gpt2"} <= set(REGISTRY)
    smol = REGISTRY["smollm2-135m-instruct"].source
    assert isinstance(smol, PypiGGUFSource) and len(smol.sha256) == 64
    assert len(REGISTRY["gemma3-270m"].source.parts) == 4


@pytest.mark.parametrize("name", ["smollm2", "SmolLM2-135M-Instruct", "smollm2-135m-instruct ", "tiny", "llama"])
def test_names_are_exact(name):
    with pytest.raises(UnknownNameError) as e:
        get_spec(name)
    assert "smollm2-135m-instruct" in str(e.value)  # the message lists the known names


def test_unknown_name_on_load_is_clear():
    with pytest.raises(UnknownNameError, match="unknown model 'no such model'"):
        workbench.load("no such model")


def test_close_names_are_suggested_not_used():
    with pytest.raises(UnknownNameError, match="Did you mean 'tiny-llama'"):
        workbench.load("tiny-lama")


@pytest.mark.parametrize("name,cls", [("tiny-llama", "LlamaForCausalLM"), ("tiny-gpt2", "GPT2LMHeadModel")])
def test_tiny_models_are_deterministic(name, cls):
    m1, tok = workbench.load(name, device="cpu")
    m2, _ = workbench.load(name, device="cpu")
    assert type(m1).__name__ == cls and not m1.training and m1.dtype == torch.float32
    ids = torch.tensor([tok("hello world")["input_ids"]])
    l1, l2 = m1(ids).logits, m2(ids).logits
    assert torch.equal(l1, l2)
    assert l1.shape == (1, ids.shape[1], len(tok))
    assert l1.std() > 0.1  # random weights, not zeros


def test_tiny_load_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    workbench.load("tiny-llama")
    assert torch.equal(torch.rand(3), expected)


def test_dtype_and_device_options():
    m, _ = workbench.load("tiny-llama", device="cpu", dtype="bfloat16")
    assert m.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        workbench.load("tiny-llama", dtype="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            workbench.load("tiny-llama", device="cuda")


def test_local_folder_roundtrip(tmp_path, tiny_llama):
    model, tok = tiny_llama
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    m2, tok2 = workbench.load(str(tmp_path), device="cpu")
    ids = torch.tensor([tok("abc")["input_ids"]])
    assert tok2("abc")["input_ids"] == tok("abc")["input_ids"]
    torch.testing.assert_close(m2(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelUnavailableError, match="no config.json"):
        workbench.load(str(tmp_path))


def test_hub_id_offline_is_clear():
    with pytest.raises(ModelUnavailableError, match="Hugging Face Hub"):
        workbench.load("some-org/some-model-that-is-not-cached")


def test_tiny_tokenizer_is_bytes(tiny_llama):
    _, tok = tiny_llama
    text = "héllo, wörld ✓"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
