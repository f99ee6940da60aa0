# One-command entry points. Each target installs what it needs first.
PYTHON ?= python3
PIP_FLAGS ?= --quiet --disable-pip-version-check

.PHONY: install test demo bench clean

install:
	$(PYTHON) -m pip install $(PIP_FLAGS) -e ".[dev]"

test: install
	$(PYTHON) -m pytest -q

demo: install
	$(PYTHON) -m common.demo --out demo

clean:
	rm -rf demo work .pytest_cache
