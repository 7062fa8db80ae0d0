# Two commands set everything up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

DEMO_SCRIPT ?= examples/lighthouse_keeper.json
DEMO_OUT ?= outputs

.PHONY: install demo test bench hps-env clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/storymem render $(DEMO_SCRIPT) --preset tiny --out $(DEMO_OUT)

test: install hps-env
	$(PY) -m pytest -q -p no:cacheprovider --durations=15 tests

bench: install
	$(PY) -m bench.run_all

hps-env: install
	$(MAKE) -f infra/hps-env.mk HPS_VENV=.hps-venv MAIN_VENV=$(VENV)

clean:
	rm -rf $(VENV) .hps-venv outputs
