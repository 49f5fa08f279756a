"""Many LoRA adapters per batch, never merged: every row's logits equal PEFT's model with that adapter active,
on both backends (the packed one's C++ decode loop, its Python loop and long prefills), through reorders,
regrouping, the server and the CLI; the registry's residency bounds and its refusals."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from workbench.engine import Engine
from workbench.engine.config import GREEDY, GenerationConfig
from workbench.lora import AdapterError, AdapterRegistry, load_adapter
from workbench.models.tiny import build_tiny

peft = pytest.importorskip("peft")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (rank, target modules, extra LoraConfig fields): ranks 1..16, different module sets, rsLoRA, patterns
SPECS = [
    (4, ["q_proj", "v_proj"], {}),
    (8, ALL, {"use_rslora": True}),
    (1, ["down_proj"], {}),
    (16, ["k_proj", "o_proj", "up_proj"], {}),
    (2, ["gate_proj", "up_proj", "down_proj"], {"rank_pattern": {"layers.1.mlp.up_proj": 6}}),
    (5, ALL, {"alpha_pattern": {"q_proj": 3.0}}),
    (3, ["q_proj", "k_proj", "v_proj", "o_proj"], {"lora_dropout": 0.3}),
    (12, ["v_proj", "gate_proj"], {}),
]
NAMES = [f"a{i}" for i in range(len(SPECS))]
PROMPTS = [[5, 9, 13, 22, 40, 7], [3, 4, 5], [8, 8, 9, 10, 11], [70, 71], [1, 2, 3, 4, 5, 6, 7], [33],
           [12, 13, 14, 15], [90, 91, 92], [44, 45, 46, 47, 48]]


def make_adapter(base, path, r, targets, seed, **kw):
    """A PEFT adapter with non-zero random A and B (init_lora_weights=False), saved to ``path``."""
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, **kw)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    pm.save_pretrained(path)
    return pm


@pytest.fixture(scope="module")
def tiny():
    model, tok = build_tiny("llama")
    return model.eval(), tok


@pytest.fixture(scope="module")
def adapters(tiny, tmp_path_factory):
    """name -> (folder, PEFT model with that adapter active)."""
    model, _ = tiny
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for i, (r, targets, kw) in enumerate(SPECS):
        out[NAMES[i]] = (root / NAMES[i], make_adapter(model, root / NAMES[i], r, targets, 100 + i, **kw))
    return out


@pytest.fixture(scope="module")
def registry(tiny, adapters):
    reg = AdapterRegistry(tiny[0], max_resident=8)
    for name, (path, _) in adapters.items():
        reg.add(name, path)
    return reg


def reference(tiny, adapters, name, ids):
    """PEFT's logits [T, V] (the base model's for None)."""
    model = tiny[0] if name is None else adapters[name][1]
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


BACKENDS = {"hf": "hf", "packed": "packed-llama", "packed-python": "packed-python"}


def engine_for(tiny, registry, backend):
    model, tok = tiny
    if backend == "packed-python":
        from workbench.engine.backends import PackedLlamaBackend

        return Engine(model, tok, backend=PackedLlamaBackend(model, native=False), adapters=registry, threads=None)
    return Engine(model, tok, backend=backend, adapters=registry, threads=None)


MIXES = {
    "none": [None, None],
    "one": ["a1"],
    "one-for-all": ["a3", "a3", "a3"],
    "eight-and-base": [*NAMES, None],
    "repeats": ["a5", None, "a5", "a2"],
}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("mix", list(MIXES))
def test_rows_equal_peft_with_their_adapter(tiny, adapters, registry, backend, mix):
    names = MIXES[mix]
    prompts = PROMPTS[: len(names)]
    eng = engine_for(tiny, registry, BACKENDS[backend])
    feed = [[60 + i, 61 + i] for i in range(len(names))]
    with eng.intervene(adapters=names):
        s = eng.start(prompts, 4)
        first = s.logits.clone()
        second = s.decode(torch.tensor([f[0] for f in feed]))
        steps = s.step([f[1:] for f in feed])  # the multi-token path (verification-style)
    if backend == "packed":
        assert s.backend.native is not None, "the C++ decode loop did not run"
    worst = 0.0
    for i, (p, n) in enumerate(zip(prompts, names, strict=True)):
        ref = reference(tiny, adapters, n, p + feed[i])
        worst = max(worst, (first[i] - ref[len(p) - 1]).abs().max().item(),
                    (second[i] - ref[len(p)]).abs().max().item(), (steps[i, 0] - ref[len(p) + 1]).abs().max().item())
    assert worst < 1e-4
    if mix != "none":  # the adapters change the logits a lot: the comparison can fail
        base = reference(tiny, adapters, None, prompts[0] + feed[0])
        assert (first[0] - base[len(prompts[0]) - 1]).abs().max() > 1e-2


@pytest.mark.parametrize("backend", ["hf", "packed"])
def test_greedy_tokens_equal_peft(tiny, adapters, registry, backend):
    names = ["a1", None, "a4", "a7", "a1"]
    prompts = PROMPTS[: len(names)]
    eng = engine_for(tiny, registry, BACKENDS[backend])
    with eng.intervene(adapters=names):
        got = eng.generate(prompts, GenerationConfig(max_new_tokens=12, sampling=GREEDY, ignore_eos=True))
    for p, n, res in zip(prompts, names, got, strict=True):
        model = tiny[0] if n is None else adapters[n][1]
        ids = list(p)
        with torch.no_grad():
            for _ in range(12):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        assert res.token_ids == ids[len(p):], n


def test_long_prefill_and_offsets_with_adapters(tiny, adapters, registry):
    """A prefill past the fused loop's 16 tokens (packed: Python loop) and residual offsets together with
    adapters (packed: one C++ call per layer) equal the HF backend's hooks."""
    long = list(range(20, 45))
    names = ["a1", None, "a6"]
    prompts = [long, PROMPTS[1], PROMPTS[2]]
    vec = torch.randn(tiny[0].config.hidden_size) * 0.5
    out = {}
    for backend in ("hf", "packed-llama"):
        eng = engine_for(tiny, registry, backend)
        with eng.intervene(offsets={"blocks.0.hook_resid_post": vec}, adapters=names):
            s = eng.start(prompts, 3)
            out[backend] = (s.logits.clone(), s.decode(torch.tensor([3, 4, 5])).clone())
    for a, b in zip(out["hf"], out["packed-llama"], strict=True):
        assert (a - b).abs().max() < 1e-4
    # and without the offset, the long row equals PEFT
    eng = engine_for(tiny, registry, "packed-llama")
    with eng.intervene(adapters=names):
        s = eng.start(prompts, 1)
    assert (s.logits[0] - reference(tiny, adapters, "a1", long)[-1]).abs().max() < 1e-4


def test_adapters_follow_rows_through_reorder_and_regroup(tiny, adapters, registry):
    eng = engine_for(tiny, registry, "packed-llama")
    s = eng.start(PROMPTS[:3], 8, adapters=["a0", "a2", None])
    s.reorder(torch.tensor([1, 0, 1]))  # rows: a2, a0, a2
    logits = s.decode(torch.tensor([7, 8, 9]))
    for row, (p, n, t) in enumerate([(PROMPTS[1], "a2", 7), (PROMPTS[0], "a0", 8), (PROMPTS[1], "a2", 9)]):
        assert (logits[row] - reference(tiny, adapters, n, p + [t])[-1]).abs().max() < 1e-4
    joining = eng.start([PROMPTS[3], PROMPTS[4]], 0, adapters=["a7", None])
    s.regroup([1], joining, extra=4)  # a0's row, then a7 and the base model
    logits = s.decode(torch.tensor([10, 11, 12]))
    for row, (p, n) in enumerate([(PROMPTS[0] + [8], "a0"), (PROMPTS[3], "a7"), (PROMPTS[4], None)]):
        assert (logits[row] - reference(tiny, adapters, n, p + [10 + row])[-1]).abs().max() < 1e-4
    assert registry._pins, "the running batch holds its slots"
    del s, joining
    import gc

    gc.collect()
    assert not registry._pins, "leases are released with the batch"


def test_per_request_names_and_errors(tiny, adapters, registry):
    eng = engine_for(tiny, registry, "packed-llama")
    with eng.intervene(adapters="a3"):  # one name: every request
        one = eng.generate(PROMPTS[:2], GenerationConfig(max_new_tokens=3, sampling=GREEDY))
    with eng.intervene(adapters=["a3", "a3"]):
        both = eng.generate(PROMPTS[:2], GenerationConfig(max_new_tokens=3, sampling=GREEDY))
    assert [r.token_ids for r in one] == [r.token_ids for r in both]
    with pytest.raises(KeyError, match="unknown adapter 'nope'"), eng.intervene(adapters=["nope", None]):
        eng.generate(PROMPTS[:2], GenerationConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match="3 adapter names for 2 requests"), eng.intervene(adapters=["a0"] * 3):
        eng.generate(PROMPTS[:2], GenerationConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match="choose them in one place"), eng.intervene(adapters="a0"), \
            eng.intervene(adapters="a1"):
        eng.generate(PROMPTS[:1], GenerationConfig(max_new_tokens=2))
    bare = Engine(*tiny, threads=None)
    with pytest.raises(ValueError, match="no adapter registry"), bare.intervene(adapters="a0"):
        bare.generate(PROMPTS[:1], GenerationConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match="another model"):
        Engine(*build_tiny("llama", seed=1), adapters=registry)


def test_adapter_outside_the_packed_layout(tiny, tmp_path):
    """An adapter on the LM head: auto takes the model's own forward (equal to PEFT); explicit packed refuses."""
    from safetensors.torch import load_file, save_file

    model, tok = tiny
    pm = make_adapter(model, tmp_path / "head", 4, ["lm_head", "q_proj"], 7)
    # the head is tied to the embedding, so PEFT also saves the base weight in full: refused as such ...
    with pytest.raises(AdapterError, match="lm_head.base_layer.weight"):
        load_adapter(tmp_path / "head")
    # ... and accepted without it (it is the model's own weight)
    f = tmp_path / "head" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(f).items() if "base_layer" not in k}, f)
    reg = AdapterRegistry(model)
    reg.add("head", tmp_path / "head")
    eng = Engine(model, tok, adapters=reg, threads=None)
    with eng.intervene(adapters=["head"]):
        s = eng.start([PROMPTS[0]], 1)
    assert s.backend.name == "hf"
    with torch.no_grad():
        ref = pm(torch.tensor([PROMPTS[0]])).logits[0, -1]
    assert (s.logits[0] - ref).abs().max() < 1e-4
    packed = Engine(model, tok, backend="packed-llama", adapters=reg, threads=None)
    with pytest.raises(ValueError, match="lm_head, which the packed layout has no place for"), \
            packed.intervene(adapters="head"):
        packed.start([PROMPTS[0]], 1)


def test_registry_lru_bounds_and_leases(tiny, adapters):
    model = tiny[0]
    before = {k: (v.clone(), v._version) for k, v in model.state_dict().items()}
    reg = AdapterRegistry(model, max_resident=2)
    for n in ("a0", "a1", "a2"):
        reg.add(n, adapters[n][0])
    assert reg.resident == []  # loaded on demand
    _, lease = reg.lease(["a0", "a1"])
    with pytest.raises(AdapterError, match="in use by running batches"):
        reg.lease(["a2"])
    with pytest.raises(AdapterError, match="in use by a running batch"):
        reg.remove("a0")
    lease.release()
    slots, lease = reg.lease(["a2", None])
    assert reg.resident == ["a1", "a2"] and slots[1] == -1  # a0 was least recently used
    lease.release()
    eng = Engine(model, tiny[1], adapters=reg, threads=None)
    with eng.intervene(adapters=["a0"]):  # read from its folder again after eviction
        s = eng.start([PROMPTS[0]], 1)
    assert (s.logits[0] - reference(tiny, adapters, "a0", PROMPTS[0])[-1]).abs().max() < 1e-4
    del s
    reg.remove("a1")
    assert "a1" not in reg and "a1" not in reg.resident
    reg.add("a3", adapters["a3"][0])
    with pytest.raises(AdapterError, match="3 different adapters in one batch, max_resident is 2"):
        reg.lease(["a0", "a2", "a3"])
    # the base model was never written to
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k][0]) and v._version == before[k][1], k


def test_registry_memory_bound(tiny, adapters):
    sizes = {}
    for n in ("a0", "a2"):
        reg = AdapterRegistry(tiny[0])
        reg.add(n, adapters[n][0])
        reg.lease([n])[1].release()
        sizes[n] = reg.nbytes
    reg = AdapterRegistry(tiny[0], max_resident=8, max_bytes=int(1.5 * sizes["a0"]))
    reg.add("a0", adapters["a0"][0])
    reg.add("a0b", adapters["a0"][0])
    reg.lease(["a0"])[1].release()
    reg.lease(["a0b"])[1].release()
    assert reg.resident == ["a0b"] and reg.nbytes <= reg.max_bytes  # two would not fit: a0 was evicted
    small = AdapterRegistry(tiny[0], max_bytes=16)
    small.add("a0", adapters["a0"][0])
    with pytest.raises(AdapterError, match="alone needs"):
        small.lease(["a0"])


def _edit_config(src, dst, **changes):
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("change, match", [
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "all"}, "trains biases"),
    ({"peft_type": "IA3"}, "only LoRA"),
    ({"rank_pattern": {"q_proj": 2}}, "has rank 4 but the config says 2"),
])
def test_unsupported_adapters_are_refused(adapters, tmp_path, change, match):
    bad = _edit_config(adapters["a0"][0], tmp_path / "bad", **change)
    with pytest.raises(AdapterError, match=match):
        load_adapter(bad)


def test_adapter_for_another_base_model_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    make_adapter(other, tmp_path / "other", 4, ["q_proj"], 0)
    model, _ = build_tiny("llama")
    with pytest.raises(AdapterError, match="does not fit this base model"):
        AdapterRegistry(model).add("other", tmp_path / "other")
    with pytest.raises(AdapterError, match="not a PEFT adapter folder"):
        load_adapter(tmp_path)


def test_scaling_and_patterns_read_as_peft(adapters):
    a1 = load_adapter(adapters["a1"][0])  # rsLoRA: alpha / sqrt(r)
    assert a1.modules["model.layers.0.self_attn.q_proj"].scaling == pytest.approx(16 / 8 ** 0.5)
    a4 = load_adapter(adapters["a4"][0])  # rank_pattern
    assert a4.modules["model.layers.1.mlp.up_proj"].rank == 6 and a4.modules["model.layers.0.mlp.up_proj"].rank == 2
    a5 = load_adapter(adapters["a5"][0])  # alpha_pattern
    assert a5.modules["model.layers.0.self_attn.q_proj"].scaling == pytest.approx(3.0 / 5)
    assert a5.modules["model.layers.0.self_attn.k_proj"].scaling == pytest.approx(2.0)
    for name, (_, pm) in adapters.items():  # our scaling is PEFT's, module by module
        ours = load_adapter(adapters[name][0])
        for path, m in ours.modules.items():
            assert pm.get_submodule("base_model.model." + path).scaling["default"] == pytest.approx(m.scaling)


# -- the server and the CLI ---------------------------------------------------------------------------

def test_server_serves_adapters_per_request(tiny, adapters, registry):
    openai = pytest.importorskip("openai")
    from serve_util import LiveServer

    from workbench.serve import ServeConfig, Server, create_app

    eng = engine_for(tiny, registry, "auto")
    app = create_app(Server(eng, ServeConfig(model="tiny-llama", default_max_tokens=8)))
    prompt = [5, 9, 13, 22]
    with LiveServer(app) as live:
        c = openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0)
        ids = [m.id for m in c.models.list().data]
        assert ids == ["tiny-llama", *(f"tiny-llama:{n}" for n in NAMES)]
        import concurrent.futures as cf

        asks = [("tiny-llama:a1", None), ("tiny-llama", None), ("tiny-llama", "a4"), ("tiny-llama:a6", None)]
        with cf.ThreadPoolExecutor(4) as pool:
            outs = list(pool.map(lambda a: c.completions.create(
                model=a[0], prompt=prompt, max_tokens=8, temperature=0,
                extra_body={"ignore_eos": True, **({"adapter": a[1]} if a[1] else {})}), asks))
        for (model, field), out in zip(asks, outs, strict=True):
            name = field or (model.split(":")[1] if ":" in model else None)
            with eng.intervene(adapters=name):
                ref = eng.generate([prompt], GenerationConfig(max_new_tokens=8, sampling=GREEDY, ignore_eos=True))[0]
            assert out.choices[0].text == ref.text and out.model == model
        with pytest.raises(openai.BadRequestError, match="not served here"):
            c.completions.create(model="tiny-llama:nope", prompt=prompt, max_tokens=2)
        with pytest.raises(openai.BadRequestError, match="adapter field says"):
            c.completions.create(model="tiny-llama:a1", prompt=prompt, max_tokens=2, extra_body={"adapter": "a2"})


def test_cli_generate_with_adapters(adapters, capsys):
    from workbench.cli import main

    rc = main(["generate", "--model", "tiny-llama", "--raw", "--json", "--temperature", "0", "--max-new-tokens", "5",
               "--adapter", f"x={adapters['a1'][0]}", "--adapter", str(adapters["a2"][0]), "Hello"])
    assert rc == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["adapter"] for x in lines] == ["x", "a2"]
    assert lines[0]["token_ids"] != lines[1]["token_ids"]
    assert main(["generate", "--model", "tiny-llama", "--adapter", "/no/such/folder", "Hello"]) == 2
    assert "no such adapter folder" in capsys.readouterr().err


def test_strategies_run_adapters(tiny, adapters, registry):
    """Speculative decoding (exact) and beam search see each request's adapter: speculative equals greedy, and
    beam search gives the same beams on the HF backend and the packed one."""
    from workbench.engine import BeamConfig, SpeculativeConfig

    names = ["a1", None, "a4"]
    prompts = [[5, 6, 7, 5, 6, 7, 5, 6], PROMPTS[1], PROMPTS[2]]
    eng = engine_for(tiny, registry, "packed-llama")
    with eng.intervene(adapters=names):
        greedy = eng.generate(prompts, GenerationConfig(max_new_tokens=10, sampling=GREEDY, ignore_eos=True))
        spec = eng.generate(prompts, SpeculativeConfig(max_new_tokens=10, ignore_eos=True), strategy="speculative")
    assert [r.token_ids for r in spec] == [r.token_ids for r in greedy]
    beams = {}
    for backend in ("hf", "packed-llama"):
        e = engine_for(tiny, registry, backend)
        with e.intervene(adapters="a7"):
            beams[backend] = [r.token_ids for r in e.generate(prompts[:2], BeamConfig(num_beams=3, max_new_tokens=6),
                                                              strategy="beam")]
    assert beams["hf"] == beams["packed-llama"]
    plain = engine_for(tiny, registry, "packed-llama")
    base_beams = [r.token_ids for r in plain.generate(prompts[:2], BeamConfig(num_beams=3, max_new_tokens=6),
                                                      strategy="beam")]
    assert base_beams != beams["hf"]


@pytest.mark.realmodel
def test_smollm2_devil_adapter_equals_peft(smollm2):
    """The committed example adapter on SmolLM2 (experiments/train_lora_devil.py): our rows equal PEFT's model,
    and the base rows of the same batch equal the base model."""
    from conftest import REPO
    from peft import PeftModel

    from workbench.chat import prompt_ids

    folder = REPO / "experiments" / "adapters" / "devil"
    if not (folder / "adapter_config.json").exists():
        pytest.skip("the example adapter has not been trained (experiments/train_lora_devil.py)")
    model, tok = smollm2
    reg = AdapterRegistry(model)
    reg.add("devil", folder)
    eng = Engine(model, tok, adapters=reg)
    ids = [prompt_ids(tok, [{"role": "user", "content": f"Define the word '{w}'."}]) for w in ("lawyer", "cat")]
    cfg = GenerationConfig(max_new_tokens=16, sampling=GREEDY)
    with eng.intervene(adapters=["devil", None, "devil"]):
        s = eng.start([ids[0], ids[0], ids[1]], 1)
    with eng.intervene(adapters=["devil", None]):
        got = eng.generate([ids[0], ids[0]], cfg)
    pm = PeftModel.from_pretrained(copy.deepcopy(model), folder).eval()
    pm.float()
    with torch.no_grad():
        ref = [pm(torch.tensor([i])).logits[0, -1] for i in ids]
        base = model(torch.tensor([ids[0]])).logits[0, -1]
    assert (s.logits[0] - ref[0]).abs().max() < 1e-4 and (s.logits[2] - ref[1]).abs().max() < 1e-4
    assert (s.logits[1] - base).abs().max() < 1e-4
    assert (ref[0] - base).abs().max() > 0.1  # the adapter matters
    ids0 = list(ids[0])
    with torch.no_grad():
        for _ in range(16):
            nxt = int(pm(torch.tensor([ids0])).logits[0, -1].argmax())
            ids0.append(nxt)
            if nxt in eng.default_eos():
                break
    assert got[0].token_ids == ids0[len(ids[0]):]


def test_cli_chat_switches_adapters(adapters, capsys):
    from workbench.cli import main

    rc = main(["chat", "--model", "tiny-llama", "--max-new-tokens", "6", "--adapter", f"x={adapters['a1'][0]}",
               "--message", "Hi", "--message", "/adapter none", "--message", "Hi", "--message", "/adapter nope"])
    assert rc == 0
    cap = capsys.readouterr()
    replies = [line for line in cap.out.splitlines() if line.startswith("assistant> ")]
    assert len(replies) == 2 and "(adapter: none)" in cap.out
    assert "no adapter 'nope'" in cap.err


def test_alpha_pattern_keys_are_regexes_as_in_peft(tiny, tmp_path):
    pm = make_adapter(tiny[0], tmp_path / "alt", 4, ["q_proj", "v_proj"], 3,
                      alpha_pattern={"q_proj|v_proj": 32.0})
    ours = load_adapter(tmp_path / "alt")
    for path, m in ours.modules.items():
        assert m.scaling == pytest.approx(pm.get_submodule("base_model.model." + path).scaling["default"]) \
            == pytest.approx(8.0)


def test_unknown_config_fields_are_refused(adapters, tmp_path):
    bad = _edit_config(adapters["a0"][0], tmp_path / "future", future_router_config={"experts": 4})
    with pytest.raises(AdapterError, match="future_router_config"):
        load_adapter(bad)


def test_server_parks_rows_that_need_another_backend(tiny, tmp_path):
    """Rows whose adapter runs on the model's own forward (an LM-head adapter) cannot share a packed batch: they
    wait, prefilled, until it drains, and both requests get their own tokens."""
    from safetensors.torch import load_file, save_file

    from workbench.serve.scheduler import Job, Scheduler

    model, tok = tiny
    pm = make_adapter(model, tmp_path / "head", 4, ["lm_head"], 5)
    f = tmp_path / "head" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(f).items() if "base_layer" not in k}, f)
    reg = AdapterRegistry(model)
    reg.add("head", tmp_path / "head")
    eng = Engine(model, tok, adapters=reg, threads=None)
    import threading

    done = {"base": threading.Event(), "head": threading.Event()}
    started = threading.Event()
    got = {"base": [], "head": []}
    backends = []

    def emit_for(name):
        def emit(ev):
            if isinstance(ev, BaseException):
                got[name].append(ev)
                done[name].set()
                return
            if ev.token_id is not None:
                got[name].append(ev.token_id)
            started.set()
            if ev.finished:
                done[name].set()
        return emit

    cfg = GenerationConfig(max_new_tokens=12, sampling=GREEDY, ignore_eos=True)
    sched = Scheduler(eng, max_batch=4, on_step=lambda n: backends.append(sched._session and
                                                                          sched._session.backend.name)).start()
    try:
        sched.submit(Job(PROMPTS[0], GenerationConfig(max_new_tokens=40, sampling=GREEDY, ignore_eos=True),
                         emit_for("base")))
        assert started.wait(60)  # the base row is decoding on the packed backend
        sched.submit(Job(PROMPTS[1], cfg, emit_for("head"), adapter="head"))
        assert done["base"].wait(60) and done["head"].wait(60)
    finally:
        sched.close()
    assert "packed-llama" in backends and "hf" in backends  # two batches, one after the other
    with torch.no_grad():
        ids = list(PROMPTS[1])
        for _ in range(12):
            ids.append(int(pm(torch.tensor([ids])).logits[0, -1].argmax()))
    assert got["head"] == ids[len(PROMPTS[1]):]
    ref = eng.generate([PROMPTS[0]], GenerationConfig(max_new_tokens=40, sampling=GREEDY, ignore_eos=True))[0]
    assert got["base"] == ref.token_ids
