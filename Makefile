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

# Tests other than tests/system/ run on WORKERS processes (pytest-xdist), a test file per process
# at a time (module fixtures are built once): most of their wall time is waiting (consumer groups,
# brokers, subprocess start-ups; ~200 s of CPU in ~750 s of test time), which three processes on
# two cores overlap. The wall-clock system tests run alone after them.
# Bytecode caches are written even where PYTHONDONTWRITEBYTECODE is set: without them every worker
# (and every `chorus` subprocess) compiles the project's modules and pytest re-rewrites the asserts
# of every test module on every run, about 4 s of CPU per worker.
WORKERS ?= 3
PYTEST  := env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -m pytest
UNIT    := $(PYTEST) tests --ignore=tests/system -n $(WORKERS) --dist loadfile

# Everything (what CI runs, .ci/run): the system tests run even when a test before them failed.
test: $(STAMP) prometheus
	$(UNIT); unit=$$?; $(PYTEST) tests/system && exit $$unit

# The inner loop: everything but the wall-clock system tests (tests/system/).
check: $(STAMP) prometheus
	$(UNIT)

bench: $(STAMP)
	$(BIN)/chorus bench all --output BENCHMARKS.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
