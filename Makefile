# Set-up and entry points. `make demo` and `make test` work on a fresh machine:
# they create .venv, install what they need, and run.
PYTHON ?= python3
VENV   ?= .venv
# torch is installed first, on its own, and only into a .venv that has none. By default it comes from PyTorch's
# CPU-only index (torch 2.13.0 for Python 3.11 on x86-64: a 192 MB wheel, 754 MB installed; the demo and the tests
# run on a CPU): on Linux, torch from PyPI is the CUDA build, which brings NVIDIA's libraries (several GB). The
# version pin alone does not prevent that (it avoided CUDA only where a CPU wheel of that version was already on
# disk); the index does. By hand: pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
# A CUDA build: make demo TORCH_INDEX= (PyPI's default: CUDA on Linux), or the index URL pytorch.org's install
# selector gives; another version: make demo TORCH="torch==2.5.1". To keep a torch you already have (a CUDA one),
# install clat into that environment instead (README.md, "Install").
TORCH       ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
BIN    := $(VENV)/bin

.PHONY: demo test test-fast test-docs dist install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(BIN)/pip uninstall -y -q clat 2>/dev/null || true  # the distribution was called clat before 0.2 (now clat-at)
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/clat demo --force

# The whole suite, slow tests included, but not the documentation's minutes-long blocks (CI runs this); among them, tests/test_package.py builds the sdist and the
# wheel with `python -m build`, runs `twine check --strict` on them, and installs the wheel into a fresh environment.
# One pytest worker per CPU core, at most 8 (pytest-xdist; TEST_JOBS=0 runs them in pytest's own process), each test
# file in one worker, each torch at one thread: the tests' tensors are tiny, so two single-thread workers finish the
# suite on 2 cores in 11-12.5 min where one process at two threads took ~18 (measured 2026-12-08). Workers at two
# threads each would oversubscribe the cores.
TEST_JOBS ?= auto
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m "not docs" -n $(TEST_JOBS) --maxprocesses 8 --dist loadfile --durations=15 tests

# The documentation's minutes-long code blocks (the README's demo, docs/evaluation.md's AutoAttack runs), as written:
# 22 min on 2 quiet CPU cores (measured 2026-12-07), so CI leaves them out; the default and CI runs execute every other block.
test-docs: install
	$(BIN)/python -m pytest -q -m docs tests/test_readme.py

test-fast: install
	$(BIN)/python -m pytest -q tests

# The sdist and the wheel in dist/, checked as a package index would render them (nothing is uploaded). build
# fetches setuptools into an isolated environment (network); tests/test_package.py runs the same offline.
dist: install
	$(BIN)/python -m build --outdir dist .
	$(BIN)/twine check --strict dist/*

clean:
	rm -rf $(VENV) runs
