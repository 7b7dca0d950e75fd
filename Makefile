# One venv at .venv; every target uses it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.14.1 / torchvision 0.29.1: the pair this project is tested with.
TORCH := torch==2.14.1 torchvision==0.29.1
# Written when the install finished: the targets below install only when it is missing (a fresh
# clone, an interrupted install) or older than pyproject.toml.
INSTALLED := $(VENV)/.installed
FMNIST_DIR := $(or $(LPT_FASHION_MNIST_DIR),/usr/share/datasets/fashion-mnist)
FMNIST_HELP := Fashion-MNIST is not in $(FMNIST_DIR): install the Debian package dataset-fashion-mnist \
	(sudo apt-get install dataset-fashion-mnist), or set LPT_FASHION_MNIST_DIR to a folder holding its IDX files
# Fashion-MNIST present, or installed now where apt-get may run (as root); false otherwise.
have_fmnist = ls $(FMNIST_DIR)/train-labels-idx1-ubyte* >/dev/null 2>&1 || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)" && \
	  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null && \
	  ls $(FMNIST_DIR)/train-labels-idx1-ubyte* >/dev/null 2>&1; }

.PHONY: install fashion-mnist test test-all test-ddp demo standins clean help bench dry-run docs

help:
	@echo "make install   create $(VENV) and install lpt_lightning with test extras (demo and test do it when needed)"
	@echo "make test      fast test suite (what CI runs); sets up $(VENV) and Fashion-MNIST first where missing"
	@echo "make test-all  every test, slow end-to-end runs included"
	@echo "make demo      the three-phase pipeline on Fashion-MNIST-LT with the stand-in experts (CPU, offline, a few minutes);"
	@echo "               sets up $(VENV) and Fashion-MNIST first where missing"
	@echo "make standins  pretrain the stand-in experts into weights/standins (about 15 min, 2 CPU threads)"
	@echo "make dry-run   every GPU entry point on the CPU at its real architecture and class count (random weights,"
	@echo "               synthetic data in the real formats; ~25 min on 2 shared cores; DRY_RUN_ARGS e.g. \"--datasets inat18\")"
	@echo "make docs      render docs/benchmarks.md, docs/results.md and the README's demo block from benchmarks/results/"
	@echo "make clean     remove run outputs and caches"

$(PY):
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): pyproject.toml | $(PY)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(INSTALLED)

fashion-mnist:
	@$(have_fmnist) || { echo "$(FMNIST_HELP)" >&2; exit 1; }

# Without Fashion-MNIST the tests that need it are skipped (under CI=true the run fails: tests/conftest.py).
test: $(INSTALLED)
	@$(have_fmnist) || echo "$(FMNIST_HELP); the tests that need it are skipped" >&2
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(PY) -m pytest -q

test-all: $(INSTALLED)
	@$(have_fmnist) || echo "$(FMNIST_HELP); the tests that need it are skipped" >&2
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(PY) -m pytest -q -m ""

test-ddp: $(INSTALLED)
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(PY) -m pytest -q -m ddp

# One torch thread: two stall on each other's small ops when other jobs share the 2 cores (docs/benchmarks.md:
# 48 s against 241 s). Measured for the demo: 3.1 min with one thread, 2.5 with two on a quiet machine;
# about 5 min with one thread at load average 4.
demo: $(INSTALLED) fashion-mnist
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled OMP_NUM_THREADS=1 $(VENV)/bin/lpt pipeline --config configs/cpu/fmnist_lt_pipeline.yaml

# Offline stand-ins for the hub backbones, the two side by side (one thread each), then their card;
# STANDINS_ARGS e.g. "--out runs/standins".
standins: $(INSTALLED)
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(PY) benchmarks/pretrain_standins.py --only vit $(STANDINS_ARGS) & vit=$$!; \
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(PY) benchmarks/pretrain_standins.py --only clip $(STANDINS_ARGS) && wait $$vit
	$(PY) benchmarks/pretrain_standins.py --card $(STANDINS_ARGS)

clean:
	rm -rf runs lightning_logs .pytest_cache

# The generated pages from the stored results (tests/test_generated_docs.py checks them).
docs: $(INSTALLED)
	$(PY) -m benchmarks.report --render

bench: $(INSTALLED)
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(PY) benchmarks/run_all.py $(BENCH_ARGS)

# One thread, as the demo (docs/benchmarks.md "Dry run of the GPU entry points"); writes benchmarks/results/dry_run.json
# and that section. Weights and data are made once in /tmp/lpt_dry_run (--work).
DRY_RUN_ARGS ?= --jobs 4
dry-run: $(INSTALLED)
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled OMP_NUM_THREADS=1 $(PY) -m benchmarks.dry_run $(DRY_RUN_ARGS)
