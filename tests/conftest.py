import os

# No test may reach a model hub: CI machines have no route to one, and a hub lookup would only time out.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# Without CUDA the Triton kernels run in the interpreter, which Triton reads when it is first imported: set it
# before any test module (or the engine, or the server) imports triton, whatever order the files run in.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_llama():
    from workbench.models.tiny import build_tiny

    return build_tiny("llama")


@pytest.fixture(scope="session")
def _smollm2_session():
    import workbench

    return workbench.load("smollm2-135m-instruct", device="cpu", progress=False)


@pytest.fixture
def smollm2(request):
    """SmolLM2-135M-Instruct, loaded once; only for tests marked ``realmodel`` (``-m "not realmodel"`` must
    deselect every test that loads it, or pulls it on first use)."""
    if request.node.get_closest_marker("realmodel") is None:
        pytest.fail(f"{request.node.nodeid} uses the smollm2 fixture without @pytest.mark.realmodel")
    return request.getfixturevalue("_smollm2_session")  # after the check: no load for an unmarked test
