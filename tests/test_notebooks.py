"""Notebooks run headless with nbclient, top to bottom, without errors."""

import nbformat
import pytest
from conftest import REPO

pytestmark = pytest.mark.realmodel


def run_notebook(name: str, timeout: int) -> tuple[str, list[dict]]:
    """Execute ``notebooks/{name}`` from the repo root: (the code cells' printed text, their PNG outputs)."""
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    return "".join(o.get("text", "") for o in outputs), [o for o in outputs if "image/png" in o.get("data", {})]


def test_quickstart_notebook_runs():
    text, _ = run_notebook("quickstart.ipynb", 300)
    assert "Paris" in text
    assert "perplexity" in text


def test_interpretability_notebook_runs():
    text, images = run_notebook("interpretability.ipynb", 600)
    assert "pearson r" in text and "ce_loss_score" in text
    assert images


def test_editing_notebook_runs():
    text, _ = run_notebook("editing.ipynb", 900)
    assert "efficacy_score" in text and "undo restored the weights: True" in text
    assert "the exported model keeps the edit: True" in text


def test_steering_and_hallucination_notebook_runs():
    text, images = run_notebook("steering_and_hallucination.ipynb", 900)
    assert "strength +1.5:" in text and "monotone: True" in text
    assert "token-entropy: AUROC" in text and "level 1.0: accuracy" in text
    assert len(images) >= 3
