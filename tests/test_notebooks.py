"""Notebooks run headless with nbclient, top to bottom, without errors."""

import nbformat
import pytest
from conftest import REPO

pytestmark = pytest.mark.realmodel


def test_quickstart_notebook_runs():
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "notebooks" / "quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "Paris" in text
    assert "perplexity" in text


def test_interpretability_notebook_runs():
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "notebooks" / "interpretability.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "pearson r" in text and "ce_loss_score" in text
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def test_editing_notebook_runs():
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "notebooks" / "editing.ipynb", as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "efficacy_score" in text and "undo restored the weights: True" in text
    assert "the exported model keeps the edit: True" in text


def test_steering_and_hallucination_notebook_runs():
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "notebooks" / "steering_and_hallucination.ipynb", as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "strength +1.5:" in text and "monotone: True" in text
    assert "token-entropy: AUROC" in text and "level 1.0: accuracy" in text
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 3
