import pytest
import torch
from corpora import require

from workbench.data import corpus
from workbench.data.corpus import iter_documents, load_documents
from workbench.data.windows import token_windows
from workbench.errors import CorpusUnavailableError, UnknownNameError


@pytest.mark.parametrize("name,min_docs,needle", [
    ("gpl-3", 1, "GNU GENERAL PUBLIC LICENSE"),
    ("common-licenses", 10, "Apache License"),
    ("gcide", 100_000, "[1913 Webster]"),
    ("jargon", 2_000, "hacker"),
    ("devil", 900, "CYNIC"),
    ("fortunes", 10_000, "--"),
])
def test_named_sources_give_real_english(name, min_docs, needle):
    require(name)
    docs = load_documents(name)
    assert len(docs) >= min_docs
    assert any(needle in d for d in docs)
    assert all(d and d == d.strip() for d in docs)
    assert not any(d.startswith("00-database") or "00-database-" in d for d in docs)


def test_fortunes_are_split_per_fortune():
    require("fortunes")
    docs = load_documents("fortunes")
    assert not any("\n%\n" in d for d in docs)
    assert all(len(d) < 20_000 for d in docs)


def test_max_documents():
    require("gcide")
    assert len(load_documents("gcide", max_documents=5)) == 5


def test_dictd_base64_numbers():
    assert corpus._b64num("A") == 0
    assert corpus._b64num("/") == 63
    assert corpus._b64num("BA") == 64
    assert corpus._b64num("Bc") == 64 + 28


def test_missing_debian_package_is_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("DAERT_SHARE_ROOT", str(tmp_path))
    with pytest.raises(CorpusUnavailableError, match="apt-get install dict-gcide"):
        load_documents("gcide")
    with pytest.raises(CorpusUnavailableError, match="base-files"):
        load_documents("gpl-3")


@pytest.mark.parametrize("bad", ["GPL-3", "gpl", "wikitext"])
def test_unknown_corpus(bad):
    with pytest.raises(UnknownNameError, match="Known corpuss?: .*gpl-3"):
        load_documents(bad)


def test_file_and_folder_sources(tmp_path):
    (tmp_path / "a.txt").write_text("first document\n")
    (tmp_path / "b.txt").write_text("second\n")
    (tmp_path / "skip.md").write_text("not text")
    assert load_documents(f"file:{tmp_path / 'a.txt'}") == ["first document"]
    assert load_documents(str(tmp_path)) == ["first document", "second"]
    with pytest.raises(CorpusUnavailableError, match="no such file"):
        load_documents(f"file:{tmp_path / 'missing.txt'}")


def test_hf_source_format_is_checked():
    with pytest.raises(ValueError, match="hf:DATASET"):
        list(iter_documents("hf:only-a-name"))


def test_windows_are_consecutive_token_slices(tiny_llama):
    _, tok = tiny_llama  # byte tokenizer: token ids are the UTF-8 bytes
    docs = ["alpha beta gamma", "delta epsilon", "zeta"]
    sep = tok.eos_token_id
    flat = list(docs[0].encode()) + [sep] + list(docs[1].encode()) + [sep] + list(docs[2].encode())
    w = token_windows(tok, docs, 7)
    assert w.dtype == torch.long and w.shape == (len(flat) // 7, 7)
    assert w.flatten().tolist() == flat[: w.numel()]


def test_windows_options(tiny_llama):
    _, tok = tiny_llama
    docs = ["x" * 100]
    w = token_windows(tok, docs, 10, bos=True, max_windows=3)
    assert w.shape == (3, 10)
    assert (w[:, 0] == tok.bos_token_id).all() and (w[:, 1:] == ord("x")).all()
    with pytest.raises(ValueError, match="window must be >= 2"):
        token_windows(tok, docs, 1)
    with pytest.raises(ValueError, match="shorter than one window"):
        token_windows(tok, ["tiny"], 64)
    with pytest.raises(ValueError, match="max_windows"):
        token_windows(tok, docs, 10, max_windows=0)


def test_windows_from_named_corpus(tiny_llama):
    require("gpl-3")
    _, tok = tiny_llama
    w = token_windows(tok, "gpl-3", 128, max_windows=4)
    assert w.shape == (4, 128)
    assert bytes(w[0].tolist()).decode().startswith("GNU GENERAL PUBLIC LICENSE")
