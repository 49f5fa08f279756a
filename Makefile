# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Both run scripts/setup.sh first (idempotent; seconds when nothing changed).
VENV ?= .venv
PY := $(VENV)/bin/python
# Tests that CI runs: everything but slow and GPU tests (the SmolLM2 smoke tests included).
PYTEST_MARKERS ?= not slow and not gpu

.PHONY: setup demo test test-all test-gpu lint

setup:
	DAERT_VENV=$(VENV) bash scripts/setup.sh

demo: setup
	$(VENV)/bin/daert chat -m smollm2-135m-instruct --device cpu --message "What is the capital of France?" --max-new-tokens 48

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -m "$(PYTEST_MARKERS)"

test-all: setup
	$(VENV)/bin/pytest -m "not gpu"

# On a CUDA machine: the GPU tests, every kernel test on CUDA, then the kernel benchmark and the decode
# benchmark with CUDA graphs (print tables; the decode numbers go to a JSON that names the GPU).
test-gpu: setup
	$(VENV)/bin/pytest tests/test_gpu.py tests/test_kernels.py
	$(PY) experiments/bench_kernels.py
	$(PY) experiments/bench_decode.py --device cuda --threads 1 --batch 1 8 --repeats 3 \
		--json experiments/results/bench_decode_cuda.json

lint: setup
	$(VENV)/bin/ruff check .
