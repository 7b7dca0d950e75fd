# One venv at .venv; every target uses it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.14.1 / torchvision 0.29.1: the pair this project is tested with.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: install test test-all test-ddp demo clean help

help:
	@echo "make install   create $(VENV) and install lpt_lightning with test extras"
	@echo "make test      fast test suite (what CI runs)"
	@echo "make test-all  every test, slow end-to-end runs included"
	@echo "make demo      the three-phase pipeline on Fashion-MNIST-LT with tiny experts (CPU, offline)"
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

demo:
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(VENV)/bin/lpt pipeline --config configs/cpu/fmnist_lt_pipeline.yaml

clean:
	rm -rf runs lightning_logs .pytest_cache

bench:
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(PY) benchmarks/run_all.py $(BENCH_ARGS)
