# Bootstrap everything from a bare machine with Python 3.10+ and a C++ compiler.
# torch is pinned to the CPU build found on the dev/CI machines *before* the project
# is installed, so no install step can pull a multi-GB CUDA torch. On a GPU machine
# set TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0" from your CUDA index) instead.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PYTEST_ARGS ?=

.PHONY: venv install build demo test test-fast lint format bench clean

# megatron-core: Megatron-LM's own IndexedDataset reads our files in a test; --no-deps
# keeps it from touching torch (it needs only numpy, packaging and torch, all present).
$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)" setuptools wheel "pybind11>=2.12"
	$(PIP) install -q --no-build-isolation -e ".[dev]"
	$(PIP) install -q --no-deps "megatron-core==0.16.1"
	touch $@

venv install: $(VENV)/.installed

# Rebuild the C++ extension in place after editing csrc/.
build: $(VENV)/.installed
	$(PY) setup.py -q build_ext --inplace

demo: $(VENV)/.installed
	$(VENV)/bin/megablocks-ablate demo --out demo_out

# Both kinds of tests: unit (in-process) and integration (multi-process, kill, end to end).
test: $(VENV)/.installed
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

# Unit tests only: the quick loop while editing.
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m unit $(PYTEST_ARGS) tests

# Lint, format check and types (CI runs this before the tests).
LINT_PATHS := megablocks_ablate tests tools benchmarks setup.py
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy

# Apply the formatter and the safe lint fixes.
format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix $(LINT_PATHS)
	$(VENV)/bin/ruff format $(LINT_PATHS)

bench: $(VENV)/.installed
	$(PY) benchmarks/preprocess.py --update-docs
	$(PY) benchmarks/model_step.py --update-docs
	$(PY) benchmarks/train_throughput.py --update-docs
	$(PY) benchmarks/merge.py
	$(PY) benchmarks/eval.py --update-docs

clean:
	rm -rf build *.egg-info megablocks_ablate/*.so demo_out
