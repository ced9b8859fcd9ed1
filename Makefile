# Two entry points a new user needs: `make demo` and `make test`. Both install into .venv first.
# TORCH picks the torch build: the default is the CPU wheel this project is tested with; on a GPU
# machine use e.g. `make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"`.
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
# mergekit lives in its own venv: it is the reference the merge methods are checked against.
MERGEKIT_VENV ?= .venv-mergekit

.PHONY: install demo test lint

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

$(MERGEKIT_VENV)/.installed:
	python3 -m venv $(MERGEKIT_VENV)
	$(MERGEKIT_VENV)/bin/python -m pip install -q --upgrade pip
	$(MERGEKIT_VENV)/bin/python -m pip install -q $(TORCH)
	$(MERGEKIT_VENV)/bin/python -m pip install -q mergekit==0.1.5
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/evomerge demo

test: $(VENV)/.installed $(MERGEKIT_VENV)/.installed
	$(VENV)/bin/ruff check .
	EVOMERGE_MERGEKIT_PYTHON=$(MERGEKIT_VENV)/bin/python $(PY) -m pytest
