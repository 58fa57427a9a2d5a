# Two entry points (see README): `make demo` installs everything and runs the main
# job end to end; `make test` installs everything and runs the test suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA_DIR := /usr/share/datasets/fashion-mnist
STAMP := $(VENV)/.mesimp-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO_ARGS ?=

.PHONY: setup data demo test lint bench clean

setup: $(STAMP) data

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The pinned CPU wheel first: an unpinned torch would pull GBs of CUDA packages.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Fashion-MNIST in IDX format from Debian's dataset-fashion-mnist package.
data:
	@if [ ! -f $(DATA_DIR)/t10k-labels-idx1-ubyte.gz ]; then \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq dataset-fashion-mnist; \
	fi

# The main job: train on Fashion-MNIST (784-500-500-10, meProp k=20).
demo: setup
	$(BIN)/mesimp train --k 20 --epochs 5 -o models/fmnist-k20.pt $(DEMO_ARGS)
	$(BIN)/mesimp info models/fmnist-k20.pt

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup
	$(BIN)/python -m benchmarks.meprop_speed

clean:
	rm -rf $(VENV) build *.egg-info
