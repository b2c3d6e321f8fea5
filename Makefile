# riverline — every set-up step a fresh machine needs is in these targets.
#   make test   venv + dev install (pinned by constraints.txt) + promtool + ruff + mypy + pytest
#   make demo   venv + broker (or $KAFKA_BOOTSTRAP_SERVERS) + simulated clicks + worker + summary
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint typecheck pytest demo evaluate bench bench-instructions venv promtool broker-start broker-stop broker-status clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "riverline needs Python 3.11+; set PYTHON=python3.11 (or newer)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

# promtool (Debian's prometheus package) checks the /metrics exposition in the tests.
promtool:
	@command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's prometheus package (for promtool)"; \
	    (apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends prometheus >/dev/null)); \
	  else echo "promtool not found and cannot apt-get install it: the promtool test will be skipped"; fi; }

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy

pytest: venv promtool
	$(BIN)/pytest

test: lint typecheck pytest

demo: venv
	$(BIN)/riverline demo

bench: venv
	$(BIN)/python bench/run.py

bench-instructions: venv
	$(BIN)/python bench/instructions.py

evaluate: venv
	$(BIN)/riverline evaluate --out-dir bench/evaluation/abrupt

broker-start: venv
	$(BIN)/riverline broker start
broker-stop: venv
	$(BIN)/riverline broker stop
broker-status: venv
	$(BIN)/riverline broker status

clean:
	-$(BIN)/riverline broker stop 2>/dev/null
	rm -rf $(VENV) .riverline .mypy_cache .ruff_cache .pytest_cache
