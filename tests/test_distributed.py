"""Multi-process runs on the CPU (gloo): DDP equivalence, the pipeline under DDP, SLURM requeue."""
import copy
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lpt_lightning.checkpoints import load_checkpoint_file
from lpt_lightning.pipeline import run_pipeline
from test_pipeline import TINY
from datasets_available import needs_fmnist

REPO = Path(__file__).resolve().parents[1]
LPT = str(Path(sys.executable).with_name("lpt"))
pytestmark = needs_fmnist
# Deterministic training: no GCL noise, no dropout (their draws are seeded per rank).
DETERMINISTIC = ["--model.init_args.loss.beta=0", "--model.init_args.expert.adapter_dropout=0",
                 "--model.init_args.expert.head_dropout=0"]


def run(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    result = subprocess.run([LPT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def last_val_row(metrics_csv):
    rows = [r for r in csv.DictReader(open(metrics_csv)) if r.get("val/acc")]
    return {k: float(rows[-1][k]) for k in ("val/acc", "val/acc_many", "val/acc_medium", "val/acc_few")}


@pytest.mark.ddp
def test_phase1_on_two_processes_matches_one_process_with_the_same_global_batch(tmp_path):
    config = str(REPO / "configs/cpu/fmnist_lt_phase1.yaml")
    common = ["fit", "--config", config, "--trainer.max_epochs=2", *DETERMINISTIC]
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    run([*common, "--trainer.devices=1", "--data.batch_size=32"], tmp_path / "one")
    run([*common, "--trainer.devices=2", "--trainer.strategy=ddp", "--data.batch_size=16"], tmp_path / "two")
    runs = {n: tmp_path / n / "runs/fmnist_lt/phase1_visual" for n in ("one", "two")}
    one, two = (load_checkpoint_file(r / "checkpoints/last.ckpt")["state_dict"] for r in runs.values())
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)
    metrics = [last_val_row(r / "logs/version_0/metrics.csv") for r in runs.values()]
    assert metrics[1] == pytest.approx(metrics[0], abs=0.51)  # one borderline sample of 200 at most


def tiny_pipeline(run_dir, **overrides):
    config = copy.deepcopy(TINY)
    config["run_dir"] = str(run_dir)
    for phase in ("phase1", "phase2", "phase3"):
        config[phase]["trainer"]["max_epochs"] = 1
    config.update(overrides)
    return config


@pytest.mark.slow
@pytest.mark.ddp
def test_pipeline_under_ddp(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(tiny_pipeline(tmp_path / "run")))
    run(["pipeline", "--config", str(path), "--devices", "2"], tmp_path)
    run_dir = tmp_path / "run"
    for phase in ("phase1_visual", "phase2_visual", "phase1_vl", "phase2_vl", "phase3_moe"):
        assert load_checkpoint_file(run_dir / phase / "final.ckpt")["lpt"]["num_classes"] == 10
    cache = list((run_dir / "phase3_moe" / "expert_cache").iterdir())
    # val only (the scorer fits on the held-out split: no train cache; test runs on the images)
    assert [p.name.split("-")[0] for p in cache] == ["val"]
    shards = [np.load(cache[0] / f"rank{r}-of-2.index.npy").tolist() for r in range(2)]
    assert shards == [list(range(0, 50, 2)), list(range(1, 50, 2))]  # each rank its half, every image once
    rows = json.loads((run_dir / "phase3_moe" / "metrics.json").read_text())["results"]
    for expert, title in (("visual", "visual expert"), ("vl", "vision-language expert")):
        own = json.loads((run_dir / f"phase2_{expert}" / "metrics.json").read_text())["results"]["test"]
        assert rows[f"test: {title}"] == own  # sharded phase-2 test == merged phase-3 cache


SLURM_ENV = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "lpt-test", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
             "SLURM_NODELIST": "localhost", "SLURM_NNODES": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
             "SLURM_NODEID": "0"}


def test_slurm_preemption_requeue_resumes_to_the_same_result(tmp_path, monkeypatch, caplog):
    for key, value in SLURM_ENV.items():
        monkeypatch.setenv(key, value)
    # There is no scontrol here: Lightning's requeue call fails with a warning and training goes on.
    lpt_mode = dict(experts=["visual"], mixture=False, test=False)
    config = tiny_pipeline(tmp_path / "reference", **lpt_mode)
    config["phase1"]["trainer"]["max_epochs"] = 3
    reference = run_pipeline(**config)

    preempted = copy.deepcopy(config)
    preempted["run_dir"] = str(tmp_path / "preempted")
    preempted["phase1"]["trainer"]["callbacks"] = [{"class_path": "pipeline_helpers.SlurmPreemption",
                                                    "init_args": {"epoch": 1, "signal_batch": 1, "kill_batch": 3}}]
    with pytest.raises(RuntimeError, match="killed at the time limit"):
        run_pipeline(**preempted)
    phase_dir = tmp_path / "preempted" / "phase1_visual"
    assert list(phase_dir.glob("hpc_ckpt_*.ckpt")), "Lightning wrote no checkpoint on SIGUSR1"
    assert not (phase_dir / "final.ckpt").exists()

    requeued = copy.deepcopy(config)  # the requeued job runs the same command
    requeued["run_dir"] = str(tmp_path / "preempted")
    with caplog.at_level("INFO"):
        run_pipeline(**requeued)
    assert "resuming from" in caplog.text and "hpc_ckpt_" in caplog.text
    for phase in ("phase1_visual", "phase2_visual"):
        a = load_checkpoint_file(Path(reference[0].directory).parent / phase / "final.ckpt")["state_dict"]
        b = load_checkpoint_file(tmp_path / "preempted" / phase / "final.ckpt")["state_dict"]
        for key in a:
            assert torch.equal(a[key], b[key]), (phase, key)
