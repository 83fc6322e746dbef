# Set-up and entry points. `make demo` and `make test` work on a fresh machine:
# they create .venv, install what they need, and run.
PYTHON ?= python3
VENV   ?= .venv
# torch is installed first and explicitly, so that pip does not pick a multi-GB CUDA
# build on CPU-only machines. Override for your platform, e.g. make demo TORCH="torch==2.5.1".
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin

.PHONY: demo test test-fast install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(BIN)/pip uninstall -y -q clat 2>/dev/null || true  # the distribution was called clat before 0.2 (now clat-at)
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/clat demo --force

test: install
	$(BIN)/python -m pytest -q -m "" --durations=15 tests

test-fast: install
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) runs
