# Set-up and the two commands of the README: `make search` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install search search-fashion test test-all test-fast lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch first: this exact release installs from local files; a looser request pulls gigabytes.
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e ".[dev]"
	# DeepSpeed JIT-builds its CPU shared-memory op on the first engine start (~30 s); build it
	# once here so the first trial of a search does not pay for it.
	$(PY) -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()"
	touch $(STAMP)

install: $(STAMP)

## The main job: a real search on the embedded digits data, to a Pareto front and an export.
## Run again (or after an interruption) it resumes the same run: finished trials are kept.
RUN_DIR ?= runs/digits
search: install
	$(VENV)/bin/spvit-nas search --space search_spaces/digits.yaml --out $(RUN_DIR) \
		$(if $(wildcard $(RUN_DIR)/run.json),--resume)

## The real benchmark: Fashion-MNIST (installs Debian's dataset-fashion-mnist where it can).
FASHION_RUN_DIR ?= runs/fashion
search-fashion: install
	scripts/fashion_mnist.sh install
	$(VENV)/bin/spvit-nas search --space search_spaces/fashion.yaml --out $(FASHION_RUN_DIR) \
		$(if $(wildcard $(FASHION_RUN_DIR)/run.json),--resume)

lint: install
	$(VENV)/bin/ruff check spvit search_spaces nas launch tests bench

## The test suite (lint first), all but the multi-node cluster tests (marker `cluster`, minutes
## each: `make test-all` adds them; CI runs that). pytest's exit code 5 ("no tests collected") is
## an error. Two xdist workers: one runs the slow (Ray, DeepSpeed, PostgreSQL, driver) tests in
## order, the other the rest (tests/conftest.py); `PYTEST_WORKERS=0 make test` runs it in one
## process.
PYTEST_WORKERS ?= 2
PYTEST_MARKERS ?= not cluster
test: lint
	$(PY) -m pytest tests -q --durations=10 -n $(PYTEST_WORKERS) --dist loadgroup \
		$(if $(PYTEST_MARKERS),-m "$(PYTEST_MARKERS)"); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; fi; exit $$rc

## The whole suite, the multi-node cluster tests included (what CI runs).
test-all:
	$(MAKE) test PYTEST_MARKERS=

## The tests that start no Ray, DeepSpeed, PostgreSQL or driver subprocess (a quick check).
test-fast: lint
	$(PY) -m pytest tests -q -m "not slow"

bench: install
	$(PY) bench/core_timing.py
	$(PY) bench/spsa.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
