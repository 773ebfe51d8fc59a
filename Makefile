# chorus: every target bootstraps .venv by itself (idempotent) on a machine with Python 3.11 + pip.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test check bench prometheus clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Prometheus (Debian package) is needed by the dashboard/rules tests.
prometheus:
	@command -v prometheus >/dev/null 2>&1 || { \
	  echo "installing prometheus (Debian package)"; \
	  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus) >/dev/null \
	  || echo "warning: could not install prometheus; the Prometheus tests will be skipped"; }

run: $(STAMP)
	$(BIN)/chorus run --profile demo

# Everything (what CI runs, .ci/run).
test: $(STAMP) prometheus
	$(BIN)/python -m pytest tests

# The inner loop: everything but the wall-clock system tests (tests/system/).
check: $(STAMP) prometheus
	$(BIN)/python -m pytest tests --ignore=tests/system

bench: $(STAMP)
	$(BIN)/chorus bench all --output BENCHMARKS.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
