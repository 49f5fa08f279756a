"""Decode graphs (``Engine(graphs=...)``, :mod:`workbench.engine.graphs`) without a GPU: the fixed-buffer step
a CUDA graph records, run eagerly, against the engine's ordinary steps and HF generate; the step reads nothing
back to the host and builds no tensor from Python data (what capture forbids); the sampler's device-side step
counter; and every refusal. The captured replay itself is checked on CUDA in ``tests/test_gpu.py``."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from workbench.engine import Engine, GenerationConfig, SamplingParams
from workbench.engine.constrained import Regex
from workbench.engine.graphs import DecodeGraph
from workbench.errors import UnknownNameError
from workbench.models.tiny import build_tiny

PROMPTS = ["hello there", "a", "the quick brown fox jumps", "xyz 123 !"]
aten = torch.ops.aten


@pytest.fixture(scope="module")
def tiny():
    model, tok = build_tiny("llama")
    return model.eval(), tok


def ids_of(results):
    return [r.token_ids for r in results]


def test_eager_graph_step_greedy_equals_engine_and_hf_generate(tiny):
    model, tok = tiny
    cfg = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    graphed = ids_of(Engine(model, tok, backend="hf", graphs="eager").generate(PROMPTS, cfg))
    assert graphed == ids_of(Engine(model, tok, backend="hf").generate(PROMPTS, cfg))
    tok.padding_side = "left"
    enc = tok.pad({"input_ids": [tok(p)["input_ids"] for p in PROMPTS]}, return_tensors="pt")
    ref = model.generate(**enc, max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=None,
                         pad_token_id=tok.pad_token_id)[:, enc["input_ids"].shape[1]:].tolist()
    assert graphed == ref


def test_eager_graph_step_draws_what_the_engine_draws_with_the_triton_sampler(tiny):
    # same kernel, seeds and step counters: the same tokens, row for row (one greedy row rides along)
    model, tok = tiny
    cfgs = [GenerationConfig(max_new_tokens=6, ignore_eos=True, seed=i,
                             sampling=SamplingParams(temperature=0.0 if i == 1 else 0.9, top_p=0.95))
            for i in range(len(PROMPTS))]
    off = ids_of(Engine(model, tok, backend="hf", sampler="triton").generate(PROMPTS, cfgs))
    graphed = ids_of(Engine(model, tok, backend="hf", sampler="triton", graphs="eager").generate(PROMPTS, cfgs))
    assert graphed == off
    assert len({tuple(t) for t in off}) == len(PROMPTS)


def test_eager_graph_stream_equals_the_engine_stream_and_stops_per_row(tiny):
    model, tok = tiny
    first = Engine(model, tok, backend="hf").generate(["hello there"], GenerationConfig(max_new_tokens=8,
                                                                                         ignore_eos=True))
    eos = first[0].token_ids[3]
    cfgs = [GenerationConfig(max_new_tokens=8, eos_token_ids=[eos]), GenerationConfig(max_new_tokens=5)]

    def events(**kw):
        return [(e.index, e.token_id, e.text, e.finished) for e in
                Engine(model, tok, backend="hf", **kw).stream(["hello there", "a"], cfgs)]

    graphed = events(graphs="eager")
    assert graphed == events()
    assert sum(1 for e in graphed if e[0] == 0) < 8 and sum(1 for e in graphed if e[0] == 1) == 5


class HostReads(TorchDispatchMode):
    """Records the ops a CUDA graph capture cannot contain: reads of device values into Python and tensors
    made from Python data (an upload)."""

    FORBIDDEN = {aten._local_scalar_dense, aten.item, aten.is_nonzero, aten.lift_fresh, aten.lift_fresh_copy,
                 aten.nonzero, aten.masked_select, aten._unique2, aten.repeat_interleave}

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        masked = func.overloadpacket in (aten.index, aten.index_put, aten.index_put_) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] or ())
        if func.overloadpacket in self.FORBIDDEN or masked:  # a boolean-mask index sizes its result on the host
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_the_recorded_step_reads_nothing_back_to_the_host(tiny, monkeypatch):
    import transformers.utils.import_utils as iu

    model, tok = tiny
    eng = Engine(model, tok, backend="hf", graphs="eager")
    with torch.inference_mode():
        s = eng.start([[5, 6, 7], [8, 9]], 4)  # ragged: the mask has padding
        g = DecodeGraph(s, "eager")
        g.mask.copy_(s.mask)
        g.mask[:, s.filled] = 1
        g.positions.copy_(s.pos[:, None])
        with HostReads() as control:  # the detector sees each kind of forbidden op
            x = torch.ones(3)
            x.sum().item()
            bool(x[0] > 0)
            torch.tensor([1, 2])
            x[x > 0]
            x.nonzero()
        assert len(control.ops) == 5, control.ops
        # transformers skips its data-dependent mask shortcuts while a CUDA stream is capturing
        monkeypatch.setattr(iu, "is_cuda_stream_capturing", lambda: True)
        with HostReads() as m:
            g._body()
        assert m.ops == []


def test_sampler_step_counter_from_device_memory_draws_as_the_argument():
    from workbench.kernels import sampling

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 300, generator=g)
    args = sampling.prepare(logits, temperature=1.0, top_p=0.9, seeds=list(range(6)))
    draws = {}
    for step in (0, 3):
        by_int = sampling.launch(logits, *args, step, torch.empty(6, dtype=torch.long))
        by_tensor = sampling.launch(logits, *args, torch.tensor([step]), torch.empty(6, dtype=torch.long))
        assert torch.equal(by_int, by_tensor)
        draws[step] = by_int
    assert not torch.equal(draws[0], draws[3])  # the counter reaches the random stream


def test_sampler_launch_checks_metadata():
    from workbench.kernels import sampling

    logits = torch.randn(2, 50)
    args = sampling.prepare(logits, seeds=[1, 2])
    with pytest.raises(ValueError, match="one int64 element"):
        sampling.launch(logits, *args, torch.tensor([1, 2]), torch.empty(2, dtype=torch.long))
    with pytest.raises(ValueError, match="out must be"):
        sampling.launch(logits, *args, 0, torch.empty(3, dtype=torch.long))
    with pytest.raises(ValueError, match="offset must be an int"):
        sampling.sample(logits, offset=torch.tensor([0]))


@pytest.mark.parametrize("new_tokens", [1, 2, 3])
def test_eager_graph_step_with_the_fewest_decode_steps(tiny, new_tokens):
    # 1 new token: no decode step, no graph; 2: the graph is built with one slot left (its warm-up must not
    # write past it)
    model, tok = tiny
    cfg = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)
    graphed = ids_of(Engine(model, tok, backend="hf", graphs="eager").generate(PROMPTS, cfg))
    assert graphed == ids_of(Engine(model, tok, backend="hf").generate(PROMPTS, cfg))
    assert all(len(t) == new_tokens for t in graphed)


def test_graphs_refuse_models_whose_step_keeps_python_state():
    from workbench.context.rope_scaling import RopeScaling, apply_rope_scaling

    for change, msg in ((dict(layer_types=["sliding_attention", "full_attention"]), "keep Python state"),
                        (dict(_attn_implementation="flash_attention_2"), "attention implementation")):
        model, tok = build_tiny("llama")
        for k, v in change.items():
            setattr(model.config, k, v)
        with pytest.raises(ValueError, match=msg):
            Engine(model, tok, backend="hf", graphs="eager")
    # transformers updates these rotary embeddings' frequencies from the positions, in Python
    for rope_type in ("dynamic", "longrope"):
        model, tok = build_tiny("llama")
        model.model.rotary_emb.rope_type = rope_type
        with pytest.raises(ValueError, match=f"rope_type '{rope_type}'"):
            Engine(model, tok, backend="hf", graphs="eager")
        model.model.rotary_emb.rope_type = "yarn"  # fixed frequencies: recorded
        Engine(model, tok, backend="hf", graphs="eager")
    model, tok = build_tiny("llama")
    with apply_rope_scaling(model, RopeScaling("dynamic-ntk", factor=2.0)), \
            pytest.raises(ValueError, match="dynamic RoPE scaling hook"):
        Engine(model, tok, backend="hf", graphs="eager")


def test_graphs_refuse_interventions_before_the_prefill(tiny, monkeypatch):
    from workbench.engine import step
    from workbench.interp import Hooks

    model, tok = tiny
    eng = Engine(model, tok, backend="hf", graphs="eager")
    monkeypatch.setattr(step.Session, "__init__", lambda *a, **k: pytest.fail("prefilled"))
    cfg = GenerationConfig(max_new_tokens=4)
    with eng.intervene(offsets={"blocks.0.hook_resid_post": torch.ones(model.config.hidden_size)}), \
            pytest.raises(ValueError, match="Engine.intervene"):
        eng.generate(["hello"], cfg)
    with Hooks(model, [("blocks.0.hook_resid_post", lambda a, h: a)]), pytest.raises(ValueError, match="Hooks"):
        eng.generate(["hello"], cfg)
    handle = model.model.layers[0].register_forward_hook(lambda *a: None)
    try:
        with pytest.raises(ValueError, match="torch hooks"):
            eng.generate(["hello"], cfg)
    finally:
        handle.remove()


def test_graph_modes_refuse_what_a_recorded_step_cannot_hold(tiny):
    model, tok = tiny
    with pytest.raises(UnknownNameError, match="decode graph mode"):
        Engine(model, tok, backend="hf", graphs="on")
    with pytest.raises(ValueError, match="model is on cpu"):
        Engine(model, tok, backend="hf", graphs="cuda")
    with pytest.raises(ValueError, match="'packed-llama' was chosen"):
        Engine(model, tok, graphs="eager")
    eng = Engine(model, tok, backend="hf", graphs="eager")
    cases = [
        (GenerationConfig(max_new_tokens=4, sampling=SamplingParams(temperature=0, repetition_penalty=1.3)),
         "penalties"),
        (GenerationConfig(max_new_tokens=4, sampling=SamplingParams(temperature=0, logit_bias={3: 1.0})),
         "logit bias"),
        (GenerationConfig(max_new_tokens=4, logprobs=2), "logprobs"),
        (GenerationConfig(max_new_tokens=4, constraint=Regex("[ab]+")), "constrained"),
        (GenerationConfig(max_new_tokens=4, sampling=SamplingParams(temperature=0.8)), "fused Triton sampler"),
    ]
    for cfg, msg in cases:
        with pytest.raises(ValueError, match=msg):
            eng.generate(["hello"], cfg)
    with pytest.raises(ValueError, match="strategy 'beam'"):
        from workbench.engine import BeamConfig

        eng.generate(["hello"], BeamConfig(num_beams=2, max_new_tokens=3), strategy="beam")
    # nothing was left behind: the same engine still generates
    assert len(eng.generate(["hello"], GenerationConfig(max_new_tokens=3, ignore_eos=True))[0].token_ids) == 3
