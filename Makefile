# Every target sets up a virtualenv first, so a fresh clone needs only python3.
# PYTHON picks the interpreter; any other than the default python3 gets a venv of
# its own (.venv-3.13, say), so the suite runs on each Python side by side:
#   PYTHON=$(pyenv prefix 3.13.0)/bin/python3 make test
PYTHON ?= python3
PYVER  := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
VENV   ?= $(if $(filter python3,$(PYTHON)),.venv,.venv-$(PYVER))
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SERVE_STAMP := $(VENV)/.installed-serve
# The suite runs on four pytest workers on CI's two cores: its tests mostly
# wait on sockets, subprocesses and timeouts (1,744 tests: 5:36 on 3.11 and
# 5:55 on 3.12 with three workers, 5:13 on 3.11 with four; two took 6:13 and
# 7:02 with 1,625). PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 4

.PHONY: setup serve test test-fast bench bench-pools bench-idle soak clean

setup: $(STAMP)

# Serving needs the package alone; the tests and benchmarks need the rest.
$(SERVE_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $(SERVE_STAMP)

$(STAMP): $(SERVE_STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,gevent,dask]'
	touch $(STAMP)

serve: $(SERVE_STAMP)
	$(BIN)/muxpool serve $(SERVE_ARGS)

# Everything: what CI runs.
test: setup
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

# The edit-test loop: all but the reliability suites that start servers on every
# engine (marked slow in tests/conftest.py); `make test` still runs everything.
test-fast: setup
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(BIN)/python benchmarks/engines.py

bench-pools: setup
	$(BIN)/python benchmarks/pools.py --markdown docs/pools-benchmark.md

soak: setup
	for engine in loop threadpool threaded prefork gevent; do \
		$(BIN)/python benchmarks/soak.py --engine $$engine || exit 1; \
	done

bench-idle: setup
	$(BIN)/python benchmarks/idle_connections.py --markdown docs/idle-connections.md

clean:
	rm -rf .venv .venv-* build *.egg-info .pytest_cache .hypothesis
