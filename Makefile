# `make test` and `make demo` each set up .venv on a fresh machine: nothing relies on a hand install.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo bench lint docs clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test,bench,docs]'
	# DeepSpeed (tests/test_deepspeed.py) is an sdist whose build imports torch: built against
	# the torch above (an isolated build would fetch a CUDA torch), without its CUDA kernels.
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet --disable-pip-version-check --no-build-isolation \
		-c constraints.txt 'deepspeed>=0.15'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff format --check famo tests benchmarks docs/conf.py
	$(BIN)/ruff check famo tests benchmarks docs/conf.py
	$(BIN)/mypy famo

test: lint
	$(BIN)/python -m pytest -q

# The documentation site, offline, into docs/_build/html; a warning fails the build. `make test`
# builds it too (tests/test_docs_site.py), then opens every page in headless Chromium.
docs: $(STAMP)
	rm -rf docs/_build
	$(BIN)/python -m sphinx -W --keep-going -q -b html -d docs/_build/doctrees docs docs/_build/html
	@echo "docs: open docs/_build/html/index.html"

demo: $(STAMP)
	$(BIN)/python -m benchmarks.demo

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache docs/_build docs/_generated
