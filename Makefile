# Two entry points on a fresh machine: `make run` and `make test` (linters, then the tests).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= config.yaml
PYTEST_ARGS ?=

.PHONY: run test lint pytest venv bench clean check-config

$(STAMP): setup.cfg pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet -e '.[test,training]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/dicom-node --config $(CONFIG) serve

check-config: $(STAMP)
	$(BIN)/dicom-node --config $(CONFIG) check-config

# `make test` runs the linters first, then the suite; `make pytest` runs the suite alone.
test: lint pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy storage dicom_node

pytest: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/bench_receive.py

clean:
	rm -rf $(VENV) var build *.egg-info
