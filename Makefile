# `make test` and `make demo` each set up .venv on a fresh machine: nothing relies on a hand install.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo bench lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test,bench]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff format --check famo tests benchmarks
	$(BIN)/ruff check famo tests benchmarks
	$(BIN)/mypy famo

test: lint
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python -m benchmarks.demo

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache
