"""Logs a person can read: a redirected run prints plain lines, not progress-bar frames or tips."""
import subprocess
import sys
from pathlib import Path

from datasets_available import needs_fmnist

REPO = Path(__file__).resolve().parents[1]
LPT = str(Path(sys.executable).with_name("lpt"))


@needs_fmnist
def test_redirected_fit_log_has_plain_lines_and_no_noise(tmp_path):
    config = REPO / "configs" / "cpu" / "fmnist_lt_phase1.yaml"
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
           "PYTHONPATH": str(REPO)}
    result = subprocess.run([LPT, "fit", "--config", str(config), "--trainer.max_epochs=2",
                             "--trainer.limit_train_batches=10", "--trainer.log_every_n_steps=5"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "\r" not in log and "it/s" not in log  # no progress-bar frames
    lines = log.splitlines()
    progress = [ln for ln in lines if ln.startswith("epoch 1/2  batch 5/10  ")]
    assert progress and all(key in progress[0] for key in ("loss ", "lr ", " img/s", "ETA "))
    assert sum(ln.startswith("epoch ") and " done in " in ln and "val acc (%)" in ln for ln in lines) == 2
    assert "Split accuracy (%, lpt convention)" in log
    assert "Tip:" not in log and "litlogger" not in log and "LeafSpec" not in log
    assert len(log) < 3000
