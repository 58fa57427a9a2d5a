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

.PHONY: setup data demo demo-tagger test lint bench docs docs-serve dist clean

setup: $(STAMP) data

$(STAMP): pyproject.toml setup.py $(wildcard mesimp/csrc/*.cpp mesimp/csrc/*.h)
	$(PYTHON) -m venv $(VENV)
	# The pinned CPU wheel first: an unpinned torch would pull GBs of CUDA packages.
	$(BIN)/pip install --quiet torch==2.13.0
	# No build isolation: setup.py compiles the meProp kernels (mesimp/csrc, ~1 min)
	# against exactly this torch; a failed compile leaves the pure-Python path.
	$(BIN)/pip install --quiet 'setuptools>=77' wheel
	$(BIN)/pip install --quiet --no-build-isolation -e '.[dev,bench,docs]'
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
	$(MAKE) --no-print-directory demo-tagger

# The LSTM leg: a POS tagger on UD English EWT (../shared/data), dense h=500 vs meSimp
# (unified k=20, prune rate 0.05), shrunk, exported fp32 + int8, decoding timed.
EWT := ../shared/data/ud-english-ewt
T := models/tagger
demo-tagger: setup
	@if [ ! -f $(EWT)/en_ewt-ud-test.conllu ]; then echo "skip the tagger demo: no $(EWT)"; exit 0; fi; \
	set -e; tr="--model lstm-tagger --train $(EWT)/en_ewt-ud-dev.conllu --test $(EWT)/en_ewt-ud-test.conllu --epochs 10 --lr 3e-3"; \
	$(BIN)/mesimp train $$tr -o $(T)-dense.pt $(DEMO_ARGS); \
	$(BIN)/mesimp train $$tr --k 20 --simplify --prune-rate 0.05 -o $(T)-mesimp.pt $(DEMO_ARGS); \
	$(BIN)/mesimp shrink $(T)-mesimp.pt -o $(T)-small.pt; \
	for m in dense small; do \
	  $(BIN)/mesimp export $(T)-$$m.pt --onnx --conllu $(EWT)/en_ewt-ud-test.conllu; \
	  $(BIN)/mesimp export $(T)-$$m.pt --onnx --int8 --conllu $(EWT)/en_ewt-ud-test.conllu; \
	done; \
	$(BIN)/mesimp bench $(T)-dense.onnx $(T)-small.onnx $(T)-dense.int8.onnx $(T)-small.int8.onnx \
	  --conllu $(EWT)/en_ewt-ud-test.conllu --threads 1 --markdown $(T)-bench.md

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The documentation site (mkdocs.yml, docs/): built with --strict into site/, or served
# at http://127.0.0.1:8000 with a rebuild on every edit.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-serve: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

# The sdist and the wheel in dist/, checked by twine. MESIMP_BUILD_KERNELS=0: the wheel
# carries the kernels' sources, which compile on first use against the user's own torch.
dist: setup
	rm -rf dist
	MESIMP_BUILD_KERNELS=0 $(BIN)/python -m build --no-isolation
	$(BIN)/twine check --strict dist/*

bench: setup
	$(BIN)/python -m benchmarks.run   # writes benchmarks/RESULTS.md (~19 min)

clean:
	rm -rf $(VENV) build dist site *.egg-info mesimp/_C*.so
