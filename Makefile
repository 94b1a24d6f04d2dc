# bpfree: `make report` (set up, then run the default pipeline) and `make test` (set up, run tests).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# GPU users: `make setup TORCH_CHANNEL=cu128` (or any wheel tag pytorch.org serves).
# Default: CUDA build only where `nvidia-smi` finds a GPU, CPU build everywhere else.
TORCH_CHANNEL ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
CORES ?= all
# Stage commands say `python -m stages.<name>`: run them with the venv's interpreter.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup report test lint bench dag clean-runs

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip >/dev/null || true
	@if [ "$(TORCH_CHANNEL)" = cpu ]; then \
	  echo "installing CPU torch $(TORCH_VERSION)"; \
	  $(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)+cpu" 2>/dev/null \
	  || $(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)+cpu" \
	       --extra-index-url https://download.pytorch.org/whl/cpu; \
	elif [ "$(TORCH_CHANNEL)" = cuda ]; then \
	  echo "installing CUDA torch $(TORCH_VERSION) (PyPI default build)"; \
	  $(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"; \
	else \
	  $(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)" \
	    --index-url https://download.pytorch.org/whl/$(TORCH_CHANNEL); \
	fi
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

report: setup
	$(BIN)/snakemake --cores $(CORES) report

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

# dvc.yaml is generated from models/dag.py (run after adding a study or changing imports)
dag: setup
	$(BIN)/python -m stages.dag

bench: setup
	$(BIN)/python bench/pipeline_timing.py

clean-runs:
	rm -rf runs data reports/FINDINGS.md reports/metrics.json reports/figures reports/curves .snakemake
