# mediatag — `make run` starts both services; `make test` runs every check.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BUF := node_modules/.bin/buf
# Debian's Chromium drives the browser tests (Playwright's own browser download cannot work
# without the internet).
CHROMIUM := /usr/bin/chromium

.PHONY: help install run test lint format typecheck buf-lint buf-breaking proto proto-check vendor vendor-check pytest screenshot bench clean

help:
	@echo "make run    - create .venv, install, start both services (SQLite, local disk, local analyser)"
	@echo "make test   - install test tools, then ruff, import contracts, mypy, buf lint, stale-generated check, pytest"
	@echo "make bench  - benchmarks (not tests)"
	@echo "make proto  - regenerate generated/ from protos/"
	@echo "make vendor - copy the dashboard's chart library from node_modules/ into the package"
	@echo "make screenshot - docs/dashboard.png: the dashboard under load, in Chromium"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,google]'
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

$(CHROMIUM):
	@command -v apt-get >/dev/null || { echo "the browser tests need Chromium at $(CHROMIUM)"; exit 1; }
	@echo "installing Debian's chromium for the browser tests"
	@apt-get update -qq >/dev/null
	@DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null

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

vendor: $(VENV)/.installed node_modules/.installed
	$(PY) scripts/vendor.py

vendor-check: $(VENV)/.installed node_modules/.installed
	$(PY) scripts/vendor.py --check

# The google extra is installed: its tests must run, never skip. Two worker processes: the
# tests mostly wait on servers and subprocesses, and the suite takes half the time
# (PYTEST_WORKERS=0 runs it in one process).
PYTEST_WORKERS ?= 2
pytest: $(VENV)/.installed $(CHROMIUM)
	MEDIATAG_TESTS_NEED_GOOGLE=1 $(VENV)/bin/pytest --numprocesses $(PYTEST_WORKERS)

# The dashboard with work going through it, for the README (tests write no tracked files).
screenshot: $(VENV)/.installed $(CHROMIUM)
	$(PY) -m tests.screenshot docs/dashboard.png

test: lint typecheck buf-lint proto-check vendor-check pytest

bench: $(VENV)/.installed
	$(PY) -m bench

clean:
	rm -rf $(VENV) node_modules .mypy_cache .ruff_cache .pytest_cache .import_linter_cache
