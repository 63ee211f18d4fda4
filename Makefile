# mediatag — `make run` starts both services; `make test` runs every check.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BUF := node_modules/.bin/buf

.PHONY: help install run test lint format typecheck buf-lint buf-breaking proto proto-check pytest bench clean

help:
	@echo "make run    - create .venv, install, start both services (SQLite, local disk, local analyser)"
	@echo "make test   - install test tools, then ruff, import contracts, mypy, buf lint, stale-generated check, pytest"
	@echo "make bench  - benchmarks (not tests)"
	@echo "make proto  - regenerate generated/ from protos/"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,google]'
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(VENV)/bin/mediatag serve

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

typecheck: $(VENV)/.installed
	$(VENV)/bin/mypy

buf-lint: node_modules/.installed
	$(BUF) lint

# Breaking-change check of the contract against main (run on a branch).
buf-breaking: node_modules/.installed
	$(BUF) breaking --against '.git#branch=main'

proto: $(VENV)/.installed
	$(PY) scripts/protos.py

proto-check: $(VENV)/.installed
	$(PY) scripts/protos.py --check

pytest: $(VENV)/.installed
	$(VENV)/bin/pytest

test: lint typecheck buf-lint proto-check pytest

bench: $(VENV)/.installed
	$(PY) -m bench

clean:
	rm -rf $(VENV) node_modules .mypy_cache .ruff_cache .pytest_cache .import_linter_cache
