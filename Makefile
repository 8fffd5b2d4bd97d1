# The two commands a new machine needs: `make run` and `make test`. Both set up first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# Rebuilt whenever pyproject.toml changes, so a pulled dependency change installs itself.
INSTALLED := $(VENV)/.installed

.PHONY: setup run stop status test lint gen bench clean

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[local,test,bench]'
	touch $@

setup: $(INSTALLED)

run: setup
	$(BIN)/tensorway dev up

stop:
	@if [ -x $(BIN)/tensorway ]; then $(BIN)/tensorway dev down; fi

status: setup
	$(BIN)/tensorway dev status

lint: setup
	$(BIN)/ruff check services tests bench
	$(BIN)/ruff format --check services tests bench
	$(BIN)/mypy
	$(BIN)/bandit --quiet -c pyproject.toml -r services

test: lint
	$(BIN)/pytest

gen: setup
	$(BIN)/python -m tensorway.protogen

bench: setup
	$(BIN)/tensorway bench

clean: stop
	rm -rf $(VENV) .build .tensorway
