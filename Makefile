# One-command entry points. Each target installs what it needs first.
PYTHON ?= python3
PIP_FLAGS ?= --quiet --disable-pip-version-check

.PHONY: install test test-fast demo recipe-check clean

install:
	$(PYTHON) -m pip install $(PIP_FLAGS) -e ".[dev]"

test: install           ## both tiers: the fast one, then the slow end-to-end runs
	$(PYTHON) -m pytest -q

test-fast: install      ## the fast tier only (under a minute)
	$(PYTHON) -m pytest -q -m "not slow"

demo: install           ## the whole pipeline on a synthetic dataset, on the CPU
	$(PYTHON) -m tooling.demo --out demo

clean:
	rm -rf demo work .pytest_cache
