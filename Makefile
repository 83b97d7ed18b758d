# Every target sets up .venv first, so a fresh clone needs only python3.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup serve test bench bench-pools bench-idle soak clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,gevent,dask]'
	touch $(STAMP)

serve: setup
	$(BIN)/muxpool serve $(SERVE_ARGS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

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
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
