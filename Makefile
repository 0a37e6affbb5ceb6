# One source of truth for people and CI: `make demo`, `make test`, `make check`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: all demo test test-faults lint types check contract-check asyncapi-validate bench bench-throughput run screenshot clean

all: check test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=25.1"
	$(BIN)/python -m pip install --quiet -e . --group dev
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/partnerbus demo

run: $(STAMP)
	$(BIN)/partnerbus run

# Every tier, the real-broker and fault tests included (nothing is skipped in CI). The slow
# fault runs (cluster node kill, broker restart, SIGKILL) get a pytest process of their own:
# after the rest of the suite in one process, the node-kill run once failed to drain.
test: $(STAMP)
	$(BIN)/pytest -q -m "not slow"
	$(BIN)/pytest -q -m slow

# Only the slow fault-injection runs (cluster node killed, broker restart, SIGKILL).
test-faults: $(STAMP)
	$(BIN)/pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check partnerbus tests bench

types: $(STAMP)
	$(BIN)/mypy partnerbus

check: lint types

# The published contract: the schemas and the AsyncAPI document are what the code generates,
# no breaking change without a version bump, and the document is valid AsyncAPI 3.
contract-check: $(STAMP) asyncapi-validate
	$(BIN)/partnerbus contract export --check
	$(BIN)/partnerbus contract asyncapi --check
	$(BIN)/partnerbus contract disclosure --check
	$(BIN)/partnerbus contract compat

# docs/asyncapi.yaml through the AsyncAPI project's own parser (Node.js and npm needed).
asyncapi-validate:
	cd tools/asyncapi-validate && npm ci --no-audit --no-fund --loglevel=error
	node tools/asyncapi-validate/validate.mjs docs/asyncapi.yaml

bench: $(STAMP)
	$(BIN)/python -m bench.directory --json bench/directory.json

# partnerbus end to end beside a bare aio-pika forwarder (RabbitMQ and PostgreSQL on
# loopback, rabbitmqctl on PATH); `ARGS=--quick` for small counts.
bench-throughput: $(STAMP)
	$(BIN)/python -m bench.throughput --json bench/throughput.json $(ARGS)

# The README's picture of the ops console, retaken by its browser test (Chromium needed).
screenshot: $(STAMP)
	PARTNERBUS_SCREENSHOT=1 $(BIN)/pytest -q tests/e2e/test_ops_browser.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache partnerbus.db
