# rayloop: `make up` runs the whole system on embedded defaults, `make test` runs the suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
KSERVE := .venv-kserve

.PHONY: install kserve-client system-deps up monitoring down status lint test test-fast repro bench bench-loop clean

install: $(STAMP)

# Re-installs only when the lock or the project metadata changed; otherwise a no-op. The stamp holds
# how many seconds the install took (`rayloop up` reports it).
$(STAMP): requirements.lock pyproject.toml
	@echo "[make] installing $(VENV) from requirements.lock (about 3 minutes the first time) ..."
	@started=$$(date +%s) && \
	{ test -x $(BIN)/python || $(PYTHON) -m venv $(VENV); } && \
	$(BIN)/python -m pip install --quiet --disable-pip-version-check pip==25.3 && \
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock && \
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e . && \
	echo $$(( $$(date +%s) - started )) > $(STAMP)

# KServe's SDK in a venv of its own: its caps (psutil<6, protobuf<7) conflict with Ray's pins. The v2
# client tests run tests/support/kserve_probe.py with it. Re-installs only when its lock changed.
kserve-client: $(KSERVE)/.installed

$(KSERVE)/.installed: requirements-kserve.lock
	@echo "[make] installing $(KSERVE) from requirements-kserve.lock (about a minute the first time) ..."
	@{ test -x $(KSERVE)/bin/python || $(PYTHON) -m venv $(KSERVE); } && \
	$(KSERVE)/bin/python -m pip install --quiet --disable-pip-version-check pip==25.3 && \
	$(KSERVE)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-kserve.lock && \
	touch $@

# `make up` times itself from before the install, so its summary covers a first start whole.
up:
	@started=$$(date +%s.%N); $(MAKE) --no-print-directory install && $(BIN)/rayloop up --started-at $$started

# The whole system plus a local Prometheus scraping Ray's metrics (when `prometheus` is installed).
monitoring:
	@started=$$(date +%s.%N); $(MAKE) --no-print-directory install && \
	$(BIN)/rayloop up --monitoring --started-at $$started

down: install
	$(BIN)/rayloop down

status: install
	$(BIN)/rayloop status

# Chromium, Prometheus and PostgreSQL for the tests that drive them (Debian packages, when root).
system-deps:
	@bash scripts/system-deps.sh

# Style and structure: ruff, and the import contract in pyproject.toml (imports point down; see docs/architecture.md).
lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache

test: lint system-deps kserve-client
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest

# In-process tests only (no Ray cluster, no training run): the HTTP contract, the control plane, the rules.
test-fast: lint
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m "not slow"

# The DVC pipeline: prepare -> train -> evaluate, then its metrics.
repro: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc metrics show

bench: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python bench/train.py

bench-loop: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python bench/loop.py

clean: down
	rm -rf data/mlflow.db data/mlartifacts data/ray_results data/run data/logs data/prepared data/model data/eval
