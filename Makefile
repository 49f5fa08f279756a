# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Both run scripts/setup.sh first (idempotent; seconds when nothing changed).
VENV ?= .venv
PY := $(VENV)/bin/python
# Tests that CI runs: everything but slow and GPU tests (the SmolLM2 smoke tests included).
PYTEST_MARKERS ?= not slow and not gpu

.PHONY: setup demo test test-all lint

setup:
	DAERT_VENV=$(VENV) bash scripts/setup.sh

demo: setup
	$(VENV)/bin/daert chat -m smollm2-135m-instruct --message "What is the capital of France?" --max-new-tokens 48

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -m "$(PYTEST_MARKERS)"

test-all: setup
	$(VENV)/bin/pytest -m "not gpu"

lint: setup
	$(VENV)/bin/ruff check .
