# Every target bootstraps what it needs: the Debian packages (when run as root),
# a virtualenv in .venv and the project with its development tools.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: bootstrap demo test lint bench clean

$(STAMP): pyproject.toml packaging/bootstrap-system.sh
	@bash packaging/bootstrap-system.sh
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

bootstrap: $(STAMP)

lint: bootstrap
	$(BIN)/ruff check agent tests resources
	$(BIN)/ruff format --check agent tests resources
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint
	$(BIN)/pytest

bench: bootstrap
	$(BIN)/pytest tests/bench -s -p no:cacheprovider -o testpaths=tests/bench

demo: bootstrap
	$(BIN)/python resources/demo/story.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
