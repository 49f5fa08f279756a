"""The compiled packed-llama layer loop gives bitwise the Python loop's results, and falls back cleanly."""

import pytest
import torch

from workbench.engine import native
from workbench.engine.backends import PackedLlamaBackend
from workbench.models.tiny import build_tiny


def _run(backend, ids, mask, steps=3):
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = backend.new_cache(ids.shape[0], ids.shape[1] + steps)
    out = [backend.forward(ids, mask, pos, cache, all_positions=True)]
    for _ in range(steps):
        nxt = out[-1][:, -1:].argmax(-1) if out[-1].dim() == 3 else out[-1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = pos[:, -1:] + 1
        out.append(backend.forward(nxt, mask, pos, cache))
    return out, cache


@pytest.mark.skipif(native.disabled(), reason="DAERT_NO_NATIVE is set")
def test_native_layers_bitwise_equal_python():
    model, _ = build_tiny("llama")
    py, nat = PackedLlamaBackend(model, native=False), PackedLlamaBackend(model, native=True)
    assert py.native is None and nat.native is not None
    ids = torch.randint(5, 250, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[2, :1] = 0
    (a, ca), (b, cb) = _run(py, ids, mask), _run(nat, ids, mask)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert torch.equal(ca.k, cb.k) and torch.equal(ca.v, cb.v)


def test_native_refused_with_biases_and_disabled(monkeypatch):
    from transformers import AutoModelForCausalLM

    model, _ = build_tiny("llama")
    cfg = model.config
    cfg.attention_bias = True
    biased = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match="biases"):
        PackedLlamaBackend(biased, native=True)
    assert PackedLlamaBackend(biased).native is None  # auto: the Python loop
    monkeypatch.setenv("DAERT_NO_NATIVE", "1")
    assert PackedLlamaBackend(model).native is None
    with pytest.raises(ValueError, match="disabled"):
        PackedLlamaBackend(model, native=True)


def test_engine_takes_a_backend_instance():
    from workbench.engine import Engine, GenerationConfig

    model, tok = build_tiny("llama")
    cfg = GenerationConfig(max_new_tokens=6)
    ref = Engine(model, tok, threads=None).generate(["hello there"], cfg)[0].token_ids
    eng = Engine(model, tok, threads=None, backend=PackedLlamaBackend(model, native=False))
    assert eng.generate(["hello there"], cfg)[0].token_ids == ref
    other, _ = build_tiny("llama", seed=1)
    with pytest.raises(ValueError, match="another model"):
        Engine(model, tok, backend=PackedLlamaBackend(other))
