# Two entry points a new user needs: `make demo` and `make test`. Both install into .venv first.
# TORCH picks the torch build: the default is the CPU wheel this project is tested with; on a GPU
# machine use e.g. `make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"`.
# Everything else installs at the versions in requirements/lock.txt, the ones the suite last passed
# with, so a release tomorrow cannot break these commands. `make lock` refreshes the lock from the
# newest releases; `make test LOCK= VENV=.venv-latest MERGEKIT_VENV=.venv-mergekit-latest` runs the
# suite on them without writing it.
VENV ?= .venv
TORCH ?= torch==2.13.0
LOCK ?= requirements/lock.txt
MERGEKIT_LOCK ?= requirements/mergekit-lock.txt
PY := $(VENV)/bin/python
# mergekit lives in its own venv: it is the reference the merge methods are checked against.
MERGEKIT_VENV ?= .venv-mergekit
# Torch and its CUDA packages come from TORCH, never from a lock.
NOT_LOCKED := '^(evomerge|torch|nvidia-|triton|cuda-)'

.PHONY: install demo test lint lock

$(VENV)/.installed: pyproject.toml $(LOCK)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q $(if $(LOCK),-c $(LOCK)) -e '.[test]'
	touch $@

$(MERGEKIT_VENV)/.installed: $(MERGEKIT_LOCK)
	python3 -m venv $(MERGEKIT_VENV)
	$(MERGEKIT_VENV)/bin/python -m pip install -q --upgrade pip
	$(MERGEKIT_VENV)/bin/python -m pip install -q $(TORCH)
	$(MERGEKIT_VENV)/bin/python -m pip install -q $(if $(LOCK),-c $(MERGEKIT_LOCK)) mergekit==0.1.5
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/evomerge demo

test: $(VENV)/.installed $(MERGEKIT_VENV)/.installed
	$(VENV)/bin/ruff check .
	EVOMERGE_MERGEKIT_PYTHON=$(MERGEKIT_VENV)/bin/python $(PY) -m pytest

# Fresh venvs with the newest releases; their versions become the lock (run `make test` after).
lock:
	rm -rf .venv-lock .venv-lock-mergekit
	$(MAKE) LOCK= VENV=.venv-lock MERGEKIT_VENV=.venv-lock-mergekit .venv-lock/.installed .venv-lock-mergekit/.installed
	.venv-lock/bin/python -m pip freeze --exclude-editable | grep -viE $(NOT_LOCKED) > $(LOCK)
	.venv-lock-mergekit/bin/python -m pip freeze | grep -viE $(NOT_LOCKED) > $(MERGEKIT_LOCK)
