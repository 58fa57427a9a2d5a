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
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

# Fashion-MNIST in IDX format from Debian's dataset-fashion-mnist package.
data:
	@if [ ! -f $(DATA_DIR)/t10k-labels-idx1-ubyte.gz ]; then \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq dataset-fashion-mnist; \
	fi

# The main job, end to end on Fashion-MNIST (784-500-500-10, 8 epochs each):
# a dense baseline; meSimp (unified k=60, prune rate 0.01) for 6 epochs, shrunk with
# widths rounded down to multiples of 16 (onnxruntime's GEMM blocks), fine-tuned 2
# epochs; both exported to ONNX (fp32 + int8) and timed in onnxruntime.
M := models/fmnist
demo: setup
	$(BIN)/mesimp train --epochs 8 -o $(M)-dense.pt $(DEMO_ARGS)
	$(BIN)/mesimp train --k 60 --simplify --prune-rate 0.01 --epochs 6 -o $(M)-mesimp.pt $(DEMO_ARGS)
	$(BIN)/mesimp report $(M)-mesimp.pt
	$(BIN)/mesimp shrink $(M)-mesimp.pt --round-to 16 -o $(M)-small.pt
	$(BIN)/mesimp train --init $(M)-small.pt --epochs 2 -o $(M)-small-ft.pt $(DEMO_ARGS)
	$(BIN)/mesimp export $(M)-dense.pt --onnx
	$(BIN)/mesimp export $(M)-small-ft.pt --onnx
	$(BIN)/mesimp export $(M)-dense.pt --onnx --int8
	$(BIN)/mesimp export $(M)-small-ft.pt --onnx --int8
	$(BIN)/mesimp bench $(M)-dense.onnx $(M)-small-ft.onnx $(M)-dense.int8.onnx \
	  $(M)-small-ft.int8.onnx --data $(DATA_DIR) --batch-sizes 1,256 --threads 1,2 \
	  --markdown $(M)-bench.md --plot $(M)-bench.png

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup
	$(BIN)/python -m benchmarks.run   # writes benchmarks/RESULTS.md (~35 min)

clean:
	rm -rf $(VENV) build *.egg-info
