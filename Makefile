# Tessera: the two commands a newcomer needs are `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SHELL  := /bin/bash

.PHONY: run test install services lint bench clean

$(STAMP): pyproject.toml
	@echo "tessera: creating the virtualenv in $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@echo "tessera: installing Tessera and its dependencies (about a minute the first time; pip lists each package)"
	set -o pipefail; $(BIN)/pip install --progress-bar off -e '.[test]' | grep --line-buffered -E '^(Collecting|Successfully installed)'
	touch $(STAMP)
	@echo "tessera: installed"

install: $(STAMP)  ## create the virtualenv and install Tessera with its test tools

run: $(STAMP)  ## set up and run the whole suite on embedded defaults (SQLite, embedded broker, CPU)
	$(BIN)/tessera up

services:  ## start PostgreSQL and Redis on loopback when installed but stopped
	bash scripts/ensure_services.sh

test: $(STAMP)  ## set up and run the whole test suite (SQLite and PostgreSQL + Redis variants) in two processes
	bash scripts/ensure_services.sh || true
	bash scripts/lint.sh
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: $(STAMP)  ## ruff + mypy, the same gate CI runs
	bash scripts/lint.sh

BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP)
	@echo "tessera: installing the benchmarks' extras (XGBoost, py-spy, OpenVINO)"
	set -o pipefail; $(BIN)/pip install --progress-bar off -e '.[test,bench]' | grep --line-buffered -E '^(Collecting|Successfully installed)'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)  ## install the benchmarks' extras, then run the runtime benchmark (prints tables, writes bench/results/*.json)
	$(BIN)/tessera bench runtime

clean:
	rm -rf $(VENV) .tessera .pytest_cache .ruff_cache .mypy_cache
