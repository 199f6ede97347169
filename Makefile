# Two entry points on a fresh machine: `make run` and `make test` (linters, then the tests).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= config.yaml
PYTEST_ARGS ?=

.PHONY: run test test-postgresql lint pytest venv bench clean check-config ohif

$(STAMP): setup.cfg pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet -e '.[test,training,postgresql]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/dicom-node --config $(CONFIG) serve

check-config: $(STAMP)
	$(BIN)/dicom-node --config $(CONFIG) check-config

# `make test` runs the linters first, then the suite on SQLite, then again on PostgreSQL;
# `make pytest` runs the SQLite pass alone, `make test-postgresql` the PostgreSQL pass.
test: lint pytest test-postgresql

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy storage dicom_node

pytest: $(STAMP) ohif
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The same suite with every node and index on a private PostgreSQL server (tests/postgres.py) instead of
# SQLite, less the modules whose outcome does not depend on the backend (marked backend_independent in
# tests/conftest.py: they never open the index, or choose their databases themselves; the SQLite pass ran them).
test-postgresql: $(STAMP) ohif
	MSKNODE_TEST_DATABASE=postgresql $(BIN)/python -m pytest -m "not backend_independent" $(PYTEST_ARGS)

# The prebuilt OHIF Viewer for the browser test (npm pack @ohif/app into .cache/, once); skipped without npm,
# and then the browser test says what is missing.
OHIF_VERSION := 3.13.2
OHIF_DIST    := .cache/ohif-$(OHIF_VERSION)/dist/index.html

ohif: $(OHIF_DIST)

$(OHIF_DIST):
	@if command -v npm >/dev/null; then $(PYTHON_FOR_FETCH) -m tests.browser.fetch_ohif --version $(OHIF_VERSION); \
	else echo "npm not found: the OHIF browser test will fail until Node.js/npm is installed and make ohif is run"; fi

bench: $(STAMP)
	$(BIN)/python bench/bench_receive.py

clean:
	rm -rf $(VENV) var build *.egg-info

# the fetch script needs only the standard library: the system python will do when there is no venv yet
PYTHON_FOR_FETCH = $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
