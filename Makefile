# Everyday tasks. `make run` and `make test` set up a fresh machine themselves (ops/setup.sh).
PYTHON ?= python3

.PHONY: setup proto run test test-fast lint format settings-table

setup:
	bash ops/setup.sh

proto:
	$(PYTHON) tools/gen_protos.py --clean

run: setup
	$(PYTHON) -m services.cli up

test: setup
	$(PYTHON) -m pytest -q -p no:cacheprovider

test-fast:
	$(PYTHON) -m pytest -q -x tests/unit

lint:
	$(PYTHON) -m ruff check services tests tools
	$(PYTHON) -m ruff format --check services tests tools

format:
	$(PYTHON) -m ruff format services tests tools
	$(PYTHON) -m ruff check --fix services tests tools

settings-table:
	$(PYTHON) -m services.cli settings
