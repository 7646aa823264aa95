# `make test` and `make demo` each set up .venv on a fresh machine: nothing relies on a hand install.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-floor demo bench lint docs clean

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

# The floor's core tests run even when the main suite fails, and either failing fails `make test`.
test: lint
	$(BIN)/python -m pytest -q; status=$$?; \
	$(MAKE) --no-print-directory test-floor && exit $$status

# The oldest torch famo supports (pyproject.toml: torch>=FLOOR), pinned by constraints-floor.txt,
# in an environment of its own with only what the core tests need. The core tests are the whole
# suite less FLOOR_LEFT_OUT: what needs the integrations' frameworks, the docs site's tools, the
# benchmarks' packages or a build of the package. PyPI's Linux torch wheels are CUDA builds, so
# the first install downloads about 3 GB (nvidia-* packages; 6.5 GB installed); the tests run on
# the CPU. --no-cache-dir: the download is not kept a second time in pip's cache.
FLOOR_VENV := .venv-floor
FLOOR_STAMP := $(FLOOR_VENV)/.installed
FLOOR_LEFT_OUT := famo/lightning.py famo/transformers.py tests/test_accelerate.py \
	tests/test_lightning.py tests/test_lightning_skip.py tests/test_transformers.py \
	tests/test_docs.py tests/test_docs_claims.py tests/test_docs_peers.py tests/test_docs_site.py \
	tests/test_readme.py tests/test_citation.py tests/test_packaging.py \
	tests/test_benchmarks_smoke.py tests/test_lm_example.py tests/test_qm9_gnn.py
# The 100,000-task test bounds famo's name matching at 20 s; on torch 2.8 autograd alone takes
# 12-17 s here to backpropagate through 100,000 unbound losses (1 s on 2.13): deselected there.
FLOOR_DESELECTED := tests/test_extreme.py::test_a_hundred_thousand_tasks_by_tensor_and_by_name

$(FLOOR_STAMP): pyproject.toml constraints-floor.txt
	rm -rf $(FLOOR_VENV)
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/pip install --quiet --disable-pip-version-check --no-cache-dir \
		-c constraints-floor.txt -e . 'pytest>=8' 'hypothesis>=6.100' 'numpy>=1.24'
	touch $(FLOOR_STAMP)

test-floor: $(FLOOR_STAMP)
	FAMO_FLOOR_ENV=1 $(FLOOR_VENV)/bin/python -m pytest -q $(addprefix --ignore=,$(FLOOR_LEFT_OUT)) \
		$(addprefix --deselect=,$(FLOOR_DESELECTED))

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
	rm -rf $(VENV) $(FLOOR_VENV) .mypy_cache .ruff_cache docs/_build docs/_generated
