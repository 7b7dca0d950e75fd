"""The smallest entry point of `make dry-run` (benchmarks/dry_run.py), so that it cannot rot:
``lpt fit --config configs/inat18_phase1.yaml`` at iNaturalist 2018's 8,142 classes on the real
ViT-B/16 (random weights from a local file) and synthetic data in the real json format, with only
batch size, workers, precision, batch limits and epochs overridden."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import dry_run
from lpt_lightning.checkpoints.files import load_checkpoint_file

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def test_inat18_phase1_runs_at_8142_classes(tmp_path_factory):
    work = tmp_path_factory.mktemp("dry_run")
    weights = dry_run.random_weights(work / "weights", kinds=("visual",))
    dry_run.make_data(work, "inat18")
    config = REPO / "configs" / "inat18_phase1.yaml"
    args = dry_run.phase_command(config, run_dir="", weights=weights)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "LPT_CACHE_DIR": str(work / "cache"),
           "PYTHONPATH": str(REPO)}
    record = dry_run.run_entry([sys.executable, "-m", "lpt_lightning.cli", "fit", *args], work, env,
                               work / "phase1.log")
    log = Path(record["log"]).read_text()
    assert record["ok"], log[-3000:]
    checkpoint = load_checkpoint_file(work / "runs" / "inat18" / "phase1_visual" / "checkpoints" / "last.ckpt")
    head = checkpoint["state_dict"]["expert.head.weight"]
    assert head.shape == (8142, 768) and torch.isfinite(head).all()
    assert checkpoint["global_step"] == dry_run.EPOCHS["phase1"] * dry_run.LIMIT  # limit_train_batches per epoch
    assert record["peak_rss_gb"] > 0.3  # the real ViT-B/16 was built (its fp32 weights alone are 0.34 GB)
