# Lifeline: `make run` starts everything offline; `make test` runs every test.
# Each target installs what it needs into .venv first (Python 3.11+ is all you need; `make test`
# also installs, with npm when Node.js is there, tests/node's packages for the AsyncAPI parser test
# and workers/examples/node's for the Node.js worker example).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
NODE_STAMP := tests/node/node_modules/.installed-stamp
WORKER_NODE_STAMP := workers/examples/node/node_modules/.installed-stamp

.PHONY: help install run lint test bench bench-ab bench-instr bench-profile soak chaos chaos-cluster clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Lifeline needs Python 3.11+; set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	@touch $(STAMP)

# tests/node's packages (the official AsyncAPI parser, nats.js), exactly as locked. Without npm
# the parser test skips, saying node is missing.
$(NODE_STAMP): tests/node/package.json tests/node/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		npm ci --prefix tests/node --no-audit --no-fund --ignore-scripts && touch $(NODE_STAMP); \
	else \
		echo "npm not found: install Node.js 20 for the AsyncAPI parser test (it will skip)"; \
	fi

# The Node.js worker example's packages (nats.js), exactly as locked (workers/examples/node).
$(WORKER_NODE_STAMP): workers/examples/node/package.json workers/examples/node/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		npm ci --prefix workers/examples/node --no-audit --no-fund --ignore-scripts && touch $(WORKER_NODE_STAMP); \
	else \
		echo "npm not found: install Node.js 20 to run the Node.js worker example"; \
	fi

install: $(STAMP)  ## create .venv and install Lifeline with its test tools

CONFIG ?= lifeline.example.toml
PORT   ?=
GATEWAY_PORT ?=

run: $(STAMP)  ## start NATS (embedded), the dispatcher, every worker and the HTTP gateway (CONFIG=..., PORT=..., GATEWAY_PORT=... to choose)
	$(BIN)/lifeline run --config $(CONFIG) $(if $(PORT),--port $(PORT)) $(if $(GATEWAY_PORT),--gateway-port $(GATEWAY_PORT))

# The rules are pyproject.toml's [tool.ruff.lint]; `ruff check --fix .` and `ruff format .` fix most.
lint: $(STAMP)  ## ruff check and ruff format --check (make test runs it first)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint $(STAMP) $(NODE_STAMP) $(WORKER_NODE_STAMP)  ## lint, then run the whole test suite (starts its own nats-server)
	$(BIN)/python -m pytest

bench: $(STAMP)  ## run the benchmark suite and write bench-results/
	$(BIN)/python -m tests.bench

BASE ?= HEAD
NEW  ?=

bench-ab: $(STAMP)  ## what a change buys: BASE=rev (default HEAD) against NEW=rev (default: the working tree), loaded at once; PAIRED=1: p50 at 1 in flight instead; ROUTE=fail_ok|ghost_ok: through a fallback
	$(BIN)/python -m tests.bench.ab $(if $(PAIRED),--paired) $(if $(ROUTE),--route $(ROUTE)) $(BASE) $(NEW)

bench-instr: $(STAMP)  ## instructions per request of the engine, the worker and the NATS fast path under valgrind: REVS="rev ..." (default: the working tree); NO_SAMPLING=1: tracing samples nothing
	$(BIN)/python -m tests.bench.instructions $(if $(NO_SAMPLING),--no-sampling) $(REVS)

bench-profile: $(STAMP)  ## where the dispatcher's and the worker's time goes at 64 in flight (py-spy): REV=rev (default: the working tree); writes bench-results/profile.md
	$(BIN)/python -m tests.bench.profile $(REV)

soak: $(STAMP)  ## the contract under a flood for a few minutes (60,000-request bursts); writes bench-results/soak.json
	$(BIN)/python -m tests.soak

chaos: $(STAMP)  ## jobs while dispatchers and nats-server are SIGKILLed (about 2 minutes); writes bench-results/chaos.json
	$(BIN)/python -m tests.chaos

chaos-cluster: $(STAMP)  ## the same on a three-node NATS cluster, nodes SIGKILLed too (about 3 minutes); writes bench-results/chaos-cluster.json
	$(BIN)/python -m tests.chaos --cluster

clean:  ## remove .venv, the node_modules of tests/node and workers/examples/node, and caches
	rm -rf $(VENV) .pytest_cache *.egg-info tests/node/node_modules workers/examples/node/node_modules
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
