"""The SLURM scripts of scripts/slurm/, run from a fresh checkout's layout under fake
sbatch/srun/scontrol (tests/fake_slurm/) on the CPU configs: logs, dependencies, worker counts,
a SIGUSR1 requeue and its resume."""
import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lpt_lightning.checkpoints import load_checkpoint_file
from test_pipeline import TINY
from datasets_available import needs_fmnist

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts" / "slurm"
FAKE_SLURM = Path(__file__).parent / "fake_slurm"
VENV = Path(sys.executable).parent.parent
CPU_JOB = ["--gpus-per-node=0", "--ntasks-per-node=1", "--cpus-per-task=2"]  # 1 loader worker + 1 thread


@pytest.fixture
def cluster(tmp_path):
    """A working directory laid out like a fresh clone (configs/, scripts/, no runs/) and a
    function that runs a command there with the fake SLURM tools first on PATH."""
    work = tmp_path / "clone"
    shutil.copytree(REPO / "configs", work / "configs")
    shutil.copytree(SCRIPTS, work / "scripts" / "slurm")
    state = tmp_path / "slurm-state"
    env = {"PATH": f"{FAKE_SLURM}:/usr/bin:/bin", "HOME": str(tmp_path), "FAKE_SLURM_STATE": str(state),
           "LPT_VENV": str(VENV), "PYTHONPATH": os.pathsep.join([str(REPO), str(Path(__file__).parent)]),
           "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}

    def run(*command, check=True, **extra_env):
        result = subprocess.run(list(command), cwd=work, env={**env, **extra_env}, capture_output=True, text=True,
                                timeout=1200)
        if check:
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result

    def jobs():
        return json.loads((state / "jobs.json").read_text()) if (state / "jobs.json").exists() else []

    def sruns():
        return [json.loads(line) for line in (state / "srun.jsonl").read_text().splitlines()]

    run.work, run.jobs, run.sruns = work, jobs, sruns
    return run


def test_experts_in_parallel_submits_nothing_when_a_config_is_missing(cluster):
    (cluster.work / "configs" / "cpu" / "fmnist_lt_phase3.yaml").unlink()
    result = cluster("scripts/slurm/experts_in_parallel.sh", "configs/cpu/fmnist_lt", check=False)
    assert result.returncode == 1
    assert "configs/cpu/fmnist_lt_phase3.yaml not found" in result.stderr and "nothing submitted" in result.stderr
    assert cluster.jobs() == []
    result = cluster("scripts/slurm/experts_in_parallel.sh", "no_such_dataset", check=False)
    assert result.returncode == 1 and "configs/no_such_dataset_phase1.yaml not found" in result.stderr


def test_job_without_lpt_fails_with_a_message_in_its_log(cluster):
    result = cluster("sbatch", *CPU_JOB, "scripts/slurm/phase.sbatch", "configs/cpu/fmnist_lt_phase1.yaml",
                     LPT_VENV=str(cluster.work / "no-venv"))
    [job] = cluster.jobs()
    assert job["state"] == "FAILED" and result.stdout.strip() == f"Submitted batch job {job['id']}"
    log = (cluster.work / f"slurm-lpt-phase-{job['id']}.out").read_text()
    assert "lpt not found" in log and "LPT_VENV" in log


@pytest.mark.parametrize("cpus, workers", [(1, 0), (2, 1), (8, 7)])
@pytest.mark.parametrize("script, option", [("phase.sbatch", "--data.num_workers="),
                                            ("pipeline.sbatch", "--num_workers ")])
def test_jobs_give_all_but_one_core_to_the_one_training_loader(cluster, tmp_path, cpus, workers, script, option):
    """One training loader per rank (every sampling stream shares it): workers = cores - 1, and
    the training process keeps one torch thread; the cores are not oversubscribed."""
    venv = tmp_path / "fake-venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(f'PATH="{venv / "bin"}:$PATH"\n')
    (venv / "bin" / "lpt").write_text("#!/bin/sh\nexit 0\n")
    (venv / "bin" / "lpt").chmod(0o755)
    cluster("sbatch", "--gpus-per-node=0", "--ntasks-per-node=1", f"--cpus-per-task={cpus}",
            f"scripts/slurm/{script}", "configs/cpu/fmnist_lt_phase1.yaml", LPT_VENV=str(venv))
    [call] = cluster.sruns()
    assert option + str(workers) in " ".join(call["argv"]) and call["omp_threads"] == "1"
    assert workers + int(call["omp_threads"]) == max(cpus, 1)


@needs_fmnist
@pytest.mark.slow
def test_phase_job_requeued_on_sigusr1_resumes_from_its_checkpoint(cluster):
    cluster("sbatch", *CPU_JOB, "scripts/slurm/phase.sbatch", "configs/cpu/fmnist_lt_phase1.yaml",
            "--trainer.callbacks+=pipeline_helpers.SlurmTimeLimit", "--trainer.callbacks.epoch=1",
            "--trainer.callbacks.batch=5")
    [job] = cluster.jobs()
    assert job["state"] == "COMPLETED" and job["runs"] == 2  # signalled, requeued, finished
    first, second = cluster.sruns()
    assert (first["restart"], second["restart"]) == (None, "1")
    for call in (first, second):  # 2 cores: 1 worker of the one training loader + 1 thread
        assert "--data.num_workers=1" in call["argv"] and call["omp_threads"] == "1"
    log = (cluster.work / f"slurm-lpt-phase-{job['id']}.out").read_text()  # both runs, appended
    assert log.count("Requeued SLURM job") == 1 and "Restoring states from the checkpoint path at" in log
    assert "hpc_ckpt_1.ckpt" in log and log.count("Split accuracy") == 1
    last = load_checkpoint_file(cluster.work / "runs/fmnist_lt/phase1_visual/checkpoints/last.ckpt")
    assert last["global_step"] == 2 * 23  # both epochs, 23 batches each


@needs_fmnist
@pytest.mark.slow
def test_experts_in_parallel_runs_both_chains_then_phase3_on_cpu_configs(cluster):
    result = cluster("scripts/slurm/experts_in_parallel.sh", "configs/cpu/fmnist_lt",
                     SBATCH_ARGS=" ".join(CPU_JOB))
    jobs = cluster.jobs()
    assert [j["args"][0] for j in jobs] == [f"configs/cpu/fmnist_lt_{s}.yaml" for s in
                                           ("phase1", "phase1_vl", "phase2", "phase2_vl", "phase3")]
    ids = [j["id"] for j in jobs]
    assert [j["options"].get("dependency") for j in jobs] == [
        None, None, f"afterok:{ids[0]}", f"afterok:{ids[1]}", f"afterok:{ids[2]}:{ids[3]}"]
    assert [j["state"] for j in jobs] == ["COMPLETED"] * 5, result.stdout
    assert f"phase3 {ids[4]}" in result.stdout
    for job in jobs:
        assert "Split accuracy" in (cluster.work / f"slurm-lpt-phase-{job['id']}.out").read_text()
    assert load_checkpoint_file(cluster.work / "runs/fmnist_lt/phase3_moe/checkpoints/last.ckpt")["lpt"]["phase"] \
        == "moe_scorer"


@needs_fmnist
@pytest.mark.slow
def test_pipeline_job_requeued_on_sigusr1_skips_finished_phases_and_resumes(cluster):
    config = copy.deepcopy(TINY)
    config.update(run_dir="runs/tiny", experts=["visual"], mixture=False)
    config["phase2"]["trainer"]["callbacks"] = [{"class_path": "pipeline_helpers.SlurmTimeLimit",
                                                 "init_args": {"epoch": 1, "batch": 2}}]
    (cluster.work / "tiny.yaml").write_text(yaml.safe_dump(config))
    cluster("sbatch", *CPU_JOB, "scripts/slurm/pipeline.sbatch", "tiny.yaml")
    [job] = cluster.jobs()
    assert job["state"] == "COMPLETED" and job["runs"] == 2
    assert all("--num_workers" in c["argv"] and c["argv"][c["argv"].index("--num_workers") + 1] == "1"
               for c in cluster.sruns())
    log = (cluster.work / f"slurm-lpt-pipeline-{job['id']}.out").read_text()
    assert "phase1_visual: finished earlier" in log and "phase2_visual: resuming from" in log
    assert "hpc_ckpt_" in log.split("phase2_visual: resuming from")[1].splitlines()[0]
    run = cluster.work / "runs" / "tiny"
    assert not list(run.glob("*/hpc_ckpt_*.ckpt"))
    assert json.loads((run / "phase2_visual" / "metrics.json").read_text())["results"]["test"]["acc"] >= 0


def test_prepare_job_runs_lpt_prepare_on_cpus_only_with_one_worker_per_cpu(cluster, tmp_path):
    from PIL import Image

    for c in range(2):
        (tmp_path / "raw" / f"class{c}").mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 30), (90 * c, 40 * i, 10)).save(tmp_path / "raw" / f"class{c}" / f"{i}.jpg")
    config = {"data": {"source": {"class_path": "lpt_lightning.data.ImageFolderSource",
                                  "init_args": {"root": str(tmp_path / "raw"), "name": "tiny"}}}}
    (cluster.work / "configs" / "tiny.yaml").write_text(yaml.safe_dump(config))
    cluster("sbatch", "--cpus-per-task=2", "scripts/slurm/prepare.sbatch", "configs/tiny.yaml", "prepared",
            "--short_side", "24", "--part_size", "4")
    [job] = cluster.jobs()
    assert job["state"] == "COMPLETED" and not any("gpu" in option for option in job["options"])
    [srun] = cluster.sruns()
    assert srun["argv"] == ["lpt", "prepare", "--config", "configs/tiny.yaml", "--output", "prepared",
                            "--workers", "2", "--short_side", "24", "--part_size", "4"]
    assert srun["omp_threads"] == "1"
    manifest = json.loads((cluster.work / "prepared" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == 6 and manifest["this_run"]["resized"] == 6
    log = (cluster.work / f"slurm-lpt-prepare-{job['id']}.out").read_text()
    assert "prepared tiny (train 6; 6 resized" in log
