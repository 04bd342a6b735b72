# Two set-up-and-go targets for a fresh machine: `make demo` and `make test` (see README.md).
#   make demo   the engine only (no test extras), then the bundled sample pair -> demo_output/
#   make test   adds the test extras (pytest, slicer-core: ~800 MB), then the fast suite (slow tests: make test-all)
VENV ?= .venv
PY := $(VENV)/bin/python
# Any Python >= 3.10 (torch 2.13 has wheels for 3.10-3.13); say which with `make PYTHON=python3.12 ...`.
PYTHON ?= python3
# torch is installed first and explicitly as the CPU build (pip alone would bring the multi-GB CUDA build on
# Linux). For CUDA: make TORCH_SPEC=torch==2.13.0 TORCH_INDEX=https://download.pytorch.org/whl/cu128
# On macOS/Windows (no +cpu wheels): make TORCH_SPEC=torch==2.13.0 TORCH_INDEX=
TORCH_SPEC ?= torch==2.13.0+cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=

.PHONY: demo test test-all setup setup-test
setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || \
	  { echo "JointRegSeg needs Python >= 3.10; $(PYTHON) is $$($(PYTHON) --version 2>&1). Use make PYTHON=python3.11" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q --retries 0 --timeout 10 "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(VENV)/bin/pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

# -v: a line per test as it finishes (no silent minutes); --durations: the slowest tests at the end
test: setup-test
	$(PY) -m pytest Testing -v --durations=15 $(PYTEST_ARGS)

# everything, the slow tests too (what CI runs)
test-all: setup-test
	$(PY) -m pytest Testing -v --durations=25 -m "slow or not slow" $(PYTEST_ARGS)

demo: setup
	$(PY) -m JointRegSegLib.demo --out demo_output
