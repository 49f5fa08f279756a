"""The step API and what rides on it: logprobs, streaming, speculative decoding (logprobs, draft models, stop
strings), strategy config checks, MCTS prefix reuse on the HF backend, Session used directly, import hygiene of
the engine package, and StreamingLM's refusal of hooked models.

Every reference is computed independently from the model's own full forward (no KV cache)."""

import ast
from pathlib import Path

import pytest
import torch

from workbench.engine import BeamConfig, Engine, GenerationConfig, SamplingParams
from workbench.engine.speculative import SpeculativeConfig
from workbench.models.tiny import build_tiny

ENGINE_DIR = Path(__file__).resolve().parents[1] / "workbench" / "engine"


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("llama")


def last_logits(model, ids) -> torch.Tensor:
    """The model's own next-token logits after ``ids`` (full forward, no cache)."""
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0, -1].float()


def all_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].float()


def close(a, b, atol=1e-4):
    torch.testing.assert_close(torch.as_tensor(a).float(), torch.as_tensor(b).float(), atol=atol, rtol=0)


# -- 1. logprobs are log_softmax of the processed logits -------------------------------------------------------


def processed_reference(model, prompt, toks, t, penalty, temp, k):
    """log_softmax of step t's logits after the CTRL penalty (prompt + toks[:t]), temperature and top-k."""
    x = last_logits(model, prompt + toks[:t]).clone()
    for tok in set(prompt + toks[:t]):
        x[tok] = x[tok] / penalty if x[tok] > 0 else x[tok] * penalty
    x = x / temp
    kth = torch.topk(x, k).values[-1]
    x = torch.where(x < kth, torch.full_like(x, float("-inf")), x)
    return torch.log_softmax(x, -1)


def test_sampled_logprobs_equal_processed_log_softmax(tiny):
    model, tok = tiny
    prompt = tok("hello hello world")["input_ids"]
    cfg = GenerationConfig(max_new_tokens=6, ignore_eos=True, logprobs=3, seed=1,
                           sampling=SamplingParams(temperature=0.7, top_k=20, repetition_penalty=1.3))
    [res] = Engine(model, tok).generate([prompt], cfg)
    toks = res.token_ids
    assert len(toks) == 6 and len(res.logprobs) == len(toks)
    for t, lp in enumerate(res.logprobs):
        ref = processed_reference(model, prompt, toks, t, 1.3, 0.7, 20)
        assert lp.token_id == toks[t]
        assert torch.isfinite(ref[toks[t]])  # the sampled token survived top-k
        assert abs(lp.logprob - float(ref[toks[t]])) < 1e-4, (t, lp.logprob, float(ref[toks[t]]))
        best = torch.topk(ref, 3)
        assert [i for i, _ in lp.top] == best.indices.tolist()
        close([v for _, v in lp.top], best.values)


def test_greedy_logprobs_equal_raw_log_softmax(tiny):
    model, tok = tiny
    prompt = tok("greedy please")["input_ids"]
    [res] = Engine(model, tok).generate([prompt], GenerationConfig(max_new_tokens=6, ignore_eos=True, logprobs=3))
    assert len(res.logprobs) == len(res.token_ids) == 6
    for t, lp in enumerate(res.logprobs):
        ref = torch.log_softmax(last_logits(model, prompt + res.token_ids[:t]), -1)
        assert res.token_ids[t] == int(ref.argmax())
        assert abs(lp.logprob - float(ref[res.token_ids[t]])) < 1e-4
        best = torch.topk(ref, 3)
        assert [i for i, _ in lp.top] == best.indices.tolist()
        close([v for _, v in lp.top], best.values)


def test_no_logprobs_unless_asked(tiny):
    model, tok = tiny
    [res] = Engine(model, tok).generate(["x"], GenerationConfig(max_new_tokens=3, ignore_eos=True))
    assert res.logprobs is None
    [res0] = Engine(model, tok).generate(["x"], GenerationConfig(max_new_tokens=3, ignore_eos=True, logprobs=0))
    assert len(res0.logprobs) == 3 and all(lp.top == () for lp in res0.logprobs)


# -- 2. streamed logprobs; EOS has none ------------------------------------------------------------------------


def test_stream_logprobs_match_generate(tiny):
    model, tok = tiny
    eng = Engine(model, tok)
    cfg = GenerationConfig(max_new_tokens=8, ignore_eos=True, logprobs=2, seed=3,
                           sampling=SamplingParams(temperature=0.9, top_k=30))
    events = list(eng.stream(["stream this", "b"], cfg))
    res = eng.generate(["stream this", "b"], cfg)
    for i, r in enumerate(res):
        mine = [e for e in events if e.index == i]
        assert [e.token_id for e in mine] == r.token_ids
        assert [e.logprob for e in mine] == r.logprobs
        assert all(e.logprob is not None for e in mine)


def test_eos_token_has_no_logprob(tiny):
    model, tok = tiny
    eng = Engine(model, tok)
    [free] = eng.generate(["eos me"], GenerationConfig(max_new_tokens=8, ignore_eos=True, logprobs=2))
    stop = free.token_ids[3]
    first = free.token_ids.index(stop)
    cfg = GenerationConfig(max_new_tokens=8, eos_token_ids=(stop,), logprobs=2)
    events = list(eng.stream(["eos me"], cfg))
    [res] = eng.generate(["eos me"], cfg)
    assert res.finish_reason == "eos" and res.token_ids == free.token_ids[:first]
    assert res.logprobs == free.logprobs[:first] and len(res.logprobs) == len(res.token_ids)
    assert len(events) == first + 1
    last = events[-1]
    assert last.token_id == stop and last.finished and last.finish_reason == "eos" and last.logprob is None
    assert [e.logprob for e in events[:-1]] == res.logprobs


# -- 3. validation -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [21, -1, True, 2.0])
def test_logprobs_validation(k):
    with pytest.raises(ValueError, match="logprobs"):
        GenerationConfig(logprobs=k)
    with pytest.raises(ValueError, match="logprobs"):
        SpeculativeConfig(logprobs=k)


def test_logprobs_bounds_accepted():
    assert GenerationConfig(logprobs=20).logprobs == 20 and GenerationConfig(logprobs=0).logprobs == 0


# -- 4. speculative greedy logprobs --------------------------------------------------------------------------


def test_speculative_greedy_logprobs_equal_plain(tiny):
    model, tok = tiny
    eng = Engine(model, tok)
    prompts = ["abcabcabcabc", "xyzxyzxyz xyz"]
    plain = eng.generate(prompts, GenerationConfig(max_new_tokens=12, ignore_eos=True, logprobs=2))
    spec = eng.generate(prompts, SpeculativeConfig(max_new_tokens=12, ignore_eos=True, logprobs=2),
                        strategy="speculative")
    for p, s in zip(plain, spec, strict=True):
        assert s.token_ids == p.token_ids and len(s.token_ids) == 12
        assert len(s.logprobs) == len(p.logprobs) == 12
        for a, b in zip(s.logprobs, p.logprobs, strict=True):
            assert a.token_id == b.token_id
            assert abs(a.logprob - b.logprob) < 1e-4
            assert [i for i, _ in a.top] == [i for i, _ in b.top]
            close([v for _, v in a.top], [v for _, v in b.top])
    assert spec[0].stats.proposed > 0


# -- 5. draft model by configuration -------------------------------------------------------------------------


def test_draft_model_by_name_and_by_engine(tiny):
    from workbench.engine.speculative import DRAFTS, register_draft
    from workbench.errors import UnknownNameError

    model, tok = tiny
    eng = Engine(model, tok)
    draft = build_tiny("llama", seed=1)
    prompts = ["draft me", "abab abab"]
    plain = [r.token_ids for r in eng.generate(prompts, GenerationConfig(max_new_tokens=10, ignore_eos=True))]
    register_draft("tiny-draft-test", draft)
    try:
        cfg = SpeculativeConfig(proposer="draft-model", draft="tiny-draft-test", max_new_tokens=10, ignore_eos=True)
        res = eng.generate(prompts, cfg, strategy="speculative")
        assert [r.token_ids for r in res] == plain
        assert all(r.stats.proposed > 0 for r in res)
        with pytest.raises(ValueError, match="already registered"):
            register_draft("tiny-draft-test", draft)
    finally:
        DRAFTS.pop("tiny-draft-test", None)
    by_engine = SpeculativeConfig(proposer="draft-model", draft=Engine(*draft), max_new_tokens=10, ignore_eos=True)
    assert [r.token_ids for r in eng.generate(prompts, by_engine, strategy="speculative")] == plain
    with pytest.raises(UnknownNameError, match="tiny-draft-test"):  # gone from the registry
        SpeculativeConfig(proposer="draft-model", draft="tiny-draft-test")
    with pytest.raises(UnknownNameError):
        SpeculativeConfig(proposer="draft-model", draft="no-such-draft")


# -- 6. speculative stop strings -------------------------------------------------------------------------------


def test_speculative_stop_strings_match_sample(tiny):
    model, tok = tiny
    eng = Engine(model, tok)
    prompt = "stream me"
    [free] = eng.generate([prompt], GenerationConfig(max_new_tokens=20, ignore_eos=True))
    text = free.text
    assert len(text) > 6
    stop = text[4:6]
    cut = text[: text.find(stop)]
    [spec] = eng.generate([prompt], SpeculativeConfig(max_new_tokens=20, ignore_eos=True, stop_strings=(stop,)),
                          strategy="speculative")
    [plain] = eng.generate([prompt], GenerationConfig(max_new_tokens=20, ignore_eos=True, stop_strings=(stop,)),
                           strategy="sample")
    assert plain.finish_reason == "stop" and plain.text == cut
    assert spec.finish_reason == "stop" and spec.text == cut == plain.text
    assert stop not in spec.text


# -- 7. config type per strategy -------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy,cfg", [
    ("sample", BeamConfig()), ("beam", GenerationConfig()), ("speculative", GenerationConfig()),
    ("sample", SpeculativeConfig()), ("beam", [BeamConfig()]),
])
def test_wrong_config_type_raises(tiny, strategy, cfg):
    with pytest.raises(TypeError, match="takes a"):
        Engine(*tiny).generate(["hi"], cfg, strategy=strategy)


# -- 8. MCTS prefix reuse on the HF backend -----------------------------------------------------------------


def test_engine_lm_prefix_reuse_hf_backend(tiny):
    from workbench.engine.mcts import EngineLM

    model, tok = tiny
    lm = EngineLM(Engine(model, tok, backend="hf"), max_len=64)
    seqs = [[5, 6, 7, 8, 9], [5, 6, 7, 1], [5, 6, 7, 1, 2, 3], [5, 6], [40, 41, 42]]
    for s in seqs:
        ref = torch.log_softmax(last_logits(model, s), -1)
        torch.testing.assert_close(lm.next_logprobs(s), ref, atol=1e-5, rtol=1e-5)
    # tokens run: 5 + 1 + 2 + 1 + 3; reused: 3 + 4 + 1 + 0
    assert lm.forward_tokens == 12 and lm.reused_tokens == 8


# -- 9. the Session, driven directly -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["hf", "auto"])
def test_session_api(tiny, backend):
    model, tok = tiny
    eng = Engine(model, tok, backend=backend)
    p1, p2 = [10, 11, 12, 13, 14], [20, 21, 22]
    a, b, c, d, e, f, g = 30, 31, 32, 33, 34, 35, 36
    s = eng.start([p1, p2], extra=8)
    assert s.logits.shape == (2, eng.vocab_size)
    close(s.logits[0], last_logits(model, p1), atol=1e-5)
    close(s.logits[1], last_logits(model, p2), atol=1e-5)

    out = s.step([[a, b], [c]])
    assert out.shape == (2, 2, eng.vocab_size)
    close(out[0], all_logits(model, p1 + [a, b])[-2:], atol=1e-5)
    close(out[1, 0], last_logits(model, p2 + [c]), atol=1e-5)

    s.rollback(0, 1)  # forget b
    out = s.step([[d], []])
    assert out.shape == (2, 1, eng.vocab_size)
    close(out[0, 0], last_logits(model, p1 + [a, d]), atol=1e-5)

    s.truncate(len(p1) + 1)  # keep the prompts and the first step's first slot: a / c
    out = s.step([[f], [g]])
    close(out[0, 0], last_logits(model, p1 + [a, f]), atol=1e-5)
    close(out[1, 0], last_logits(model, p2 + [c, g]), atol=1e-5)

    s.reorder(torch.tensor([1, 1]))
    out = s.decode(torch.tensor([e, e]))
    assert out.shape == (2, eng.vocab_size)
    ref = last_logits(model, p2 + [c, g, e])
    close(out[0], ref, atol=1e-5)
    close(out[1], ref, atol=1e-5)
    close(out[0], out[1], atol=1e-6)

    with pytest.raises(ValueError, match="2 rows"):
        s.step([[1]])
    left = s.capacity - s.filled
    assert left > 0
    with pytest.raises(ValueError, match="session full"):
        s.step([[1] * (left + 1), [2]])
    with pytest.raises(ValueError, match="cannot roll back"):
        s.rollback(0, 100)
    for _ in range(left):  # exactly full is fine, one more is not
        s.decode(torch.tensor([e, e]))
    with pytest.raises(ValueError, match="session full"):
        s.decode(torch.tensor([e, e]))


def test_session_start_errors(tiny):
    eng = Engine(*tiny)
    with pytest.raises(ValueError, match="non-empty prompt"):
        eng.start([[1, 2], []], extra=2)
    with pytest.raises(ValueError, match="extra"):
        eng.start([[1, 2]], extra=-1)


# -- 10. import hygiene of workbench.engine ----------------------------------------------------------------


def _module_name(path: Path) -> str:
    return "workbench.engine" if path.stem == "__init__" else f"workbench.engine.{path.stem}"


def _imports(path: Path) -> list[tuple[str, str | None]]:
    """Every import in the file, anywhere (functions included): ``(module, imported name or None)``."""
    pkg = "workbench.engine"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module
            out += [(mod, a.name) for a in node.names]
    return out


def _engine_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ENGINE_DIR.glob("*.py"))}


def _init_sources() -> dict[str, str]:
    """Name re-exported by workbench/engine/__init__.py -> the module it comes from."""
    src = {}
    for mod, name in _imports(ENGINE_DIR / "__init__.py"):
        if name is not None:
            src[name] = mod
    return src


def _targets(imports, modules, init_src) -> set[str]:
    """The workbench.engine modules an import list reaches (a name from the package: its defining module)."""
    out = set()
    for mod, name in imports:
        if mod is None:
            continue
        if mod == "workbench.engine" and name is not None:
            sub = f"workbench.engine.{name}"
            out.add(sub if sub in modules else init_src.get(name, "workbench.engine"))
        elif mod in modules:
            out.add(mod)
        elif mod.startswith("workbench.engine."):
            out.add(mod)  # a subpackage / missing module: still a dependency edge
    return out


def test_engine_import_graph_has_no_cycle():
    modules = _engine_modules()
    assert {"workbench.engine.engine", "workbench.engine.step", "workbench.engine.mcts"} <= set(modules)
    init_src = _init_sources()
    graph = {m: (_targets(_imports(p), modules, init_src) & set(modules)) - {m} for m, p in modules.items()}
    assert "workbench.engine.step" in graph["workbench.engine.engine"]  # the resolution finds real edges
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(graph, WHITE)
    cycles = []

    def visit(m, stack):
        color[m] = GREY
        for n in sorted(graph[m]):
            if color[n] == GREY:
                cycles.append(stack[stack.index(n):] + [n])
            elif color[n] == WHITE:
                visit(n, stack + [n])
        color[m] = BLACK

    for m in sorted(graph):
        if color[m] == WHITE:
            visit(m, [m])
    assert not cycles, f"import cycles among workbench.engine modules: {cycles}"


def test_import_resolution(tmp_path):
    """The checker's own resolution: relative and in-function imports are edges."""
    (tmp_path / "x.py").write_text("def f():\n    from .y import g\n")
    imps = _imports(tmp_path / "x.py")
    assert imps == [("workbench.engine.y", "g")]
    assert _targets(imps, {"workbench.engine.y": None}, {}) == {"workbench.engine.y"}
    assert _targets([("workbench.engine", "Engine")], {"workbench.engine.engine": None},
                    {"Engine": "workbench.engine.engine"}) == {"workbench.engine.engine"}


STRATEGY_FILES = ("beam.py", "speculative.py", "mcts.py")


@pytest.mark.parametrize("fname", STRATEGY_FILES)
def test_strategies_use_only_the_step_api(fname):
    path = ENGINE_DIR / fname
    modules, init_src = _engine_modules(), _init_sources()
    reached = _targets(_imports(path), modules, init_src)
    forbidden = {"workbench.engine.backends", "workbench.engine.engine"}
    assert not reached & forbidden, f"{fname} imports {sorted(reached & forbidden)}"
    problems = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Attribute):
            continue
        where = f"{fname}:{node.lineno}: {ast.unparse(node)}"
        if node.attr == "backend":
            problems.append(f"{where} (reaches the backend past the step API)")
        elif (node.attr.startswith("_") and not node.attr.startswith("__")
              and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
            problems.append(f"{where} (private attribute of another object)")
    assert not problems, "\n".join(problems)


def test_engine_imports_no_sandbox_or_rewards():
    bad = []
    for path in sorted(ENGINE_DIR.rglob("*.py")):
        for mod, name in _imports(path):
            full = [mod] if mod is None or name is None else [mod, f"{mod}.{name}"]
            for m in filter(None, full):
                if m.split(".")[:2] in (["workbench", "sandbox"], ["workbench", "rewards"]):
                    bad.append(f"{path.relative_to(ENGINE_DIR)}: {m}")
    assert not bad, bad


# -- 11. StreamingLM refuses hooked models --------------------------------------------------------------------


def test_streaming_lm_refuses_hooks(tiny):
    from workbench.context import SinkConfig, StreamingLM
    from workbench.interp import Hooks

    model, _ = tiny
    cfg = SinkConfig(n_sink=2, window=20, chunk=8)
    hooks = Hooks(model, [("blocks.0.hook_resid_post", lambda a, h: None)])
    with hooks, pytest.raises(ValueError, match="runs no hooks"):
        StreamingLM(model, cfg).feed([1, 2, 3])
    out = StreamingLM(model, cfg).feed([1, 2, 3])  # hooks removed: works, and equals the model's own
    assert out.shape == (3, model.config.vocab_size)
    close(out, all_logits(model, [1, 2, 3]), atol=1e-4)


@pytest.mark.parametrize("backend", ["hf", "packed-llama"])
def test_teacher_forced_logits_equal_hf(tiny, backend):
    model, tok = tiny
    eng = Engine(model, tok, backend=backend, threads=None)
    prompt, cont = [5, 9, 13, 22], [40, 41, 7, 3]
    ref = all_logits(model, prompt + cont)[len(prompt) - 1: len(prompt) - 1 + len(cont)]
    close(eng.teacher_forced(prompt, cont), ref)
    close(eng.teacher_forced(prompt, cont[:1]), ref[:1])
    with pytest.raises(ValueError, match="non-empty continuation"):
        eng.teacher_forced(prompt, [])
