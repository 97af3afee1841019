# Lifeline: `make run` starts everything offline; `make test` runs every test.
# Each target installs what it needs into .venv first (Python 3.11+ is all you need).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: help install run test bench soak chaos clean

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Lifeline needs Python 3.11+; set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	@touch $(STAMP)

install: $(STAMP)  ## create .venv and install Lifeline with its test tools

run: $(STAMP)  ## start NATS (embedded), the dispatcher and every worker, with the example config
	$(BIN)/lifeline run --config lifeline.example.toml

test: $(STAMP)  ## run the whole test suite (starts its own nats-server)
	$(BIN)/python -m pytest

bench: $(STAMP)  ## run the benchmark suite and write bench-results/
	$(BIN)/python -m tests.bench

soak: $(STAMP)  ## the contract under a flood for a few minutes (60,000-request bursts); writes bench-results/soak.json
	$(BIN)/python -m tests.soak

chaos: $(STAMP)  ## jobs while dispatchers and nats-server are SIGKILLed (about 2 minutes); writes bench-results/chaos.json
	$(BIN)/python -m tests.chaos

clean:  ## remove .venv and caches
	rm -rf $(VENV) .pytest_cache *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
