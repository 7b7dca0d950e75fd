# One venv at .venv; every target uses it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.14.1 / torchvision 0.29.1: the pair this project is tested with.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: install test test-all test-ddp demo standins clean help

help:
	@echo "make install   create $(VENV) and install lpt_lightning with test extras"
	@echo "make test      fast test suite (what CI runs)"
	@echo "make test-all  every test, slow end-to-end runs included"
	@echo "make demo      the three-phase pipeline on Fashion-MNIST-LT with the stand-in experts (CPU, offline, a few minutes)"
	@echo "make standins  pretrain the stand-in experts into weights/standins (about 15 min, 2 CPU threads)"
	@echo "make clean     remove run outputs and caches"

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"

test:
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(PY) -m pytest -q

test-all:
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(PY) -m pytest -q -m ""

test-ddp:
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(PY) -m pytest -q -m ddp

# One torch thread: two stall on each other's small ops when other jobs share the 2 cores (docs/benchmarks.md:
# 48 s against 241 s). Measured for the demo: 3.1 min with one thread, 2.5 with two on a quiet machine;
# about 5 min with one thread at load average 4.
demo:
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled OMP_NUM_THREADS=1 $(VENV)/bin/lpt pipeline --config configs/cpu/fmnist_lt_pipeline.yaml

# Offline stand-ins for the hub backbones, the two side by side (one thread each), then their card;
# STANDINS_ARGS e.g. "--out runs/standins".
standins:
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(PY) benchmarks/pretrain_standins.py --only vit $(STANDINS_ARGS) & vit=$$!; \
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(PY) benchmarks/pretrain_standins.py --only clip $(STANDINS_ARGS) && wait $$vit
	$(PY) benchmarks/pretrain_standins.py --card $(STANDINS_ARGS)

clean:
	rm -rf runs lightning_logs .pytest_cache

bench:
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(PY) benchmarks/run_all.py $(BENCH_ARGS)
