"""`lpt pipeline` with W&B in offline mode, read back from the run files: one run per phase, a
killed (or SLURM-requeued) and resumed phase appending to its own run, and every reported number
computed from the phase's final.ckpt."""
import copy
import json

import pytest

from lpt_lightning.cli import LPTCLI
from lpt_lightning.pipeline import run_pipeline
from lpt_lightning.pipeline_plan import WandbSpec, wandb_run_id
from test_distributed import SLURM_ENV
from test_pipeline import TINY
from wandb_offline import read_offline_runs
from datasets_available import needs_fmnist

pytestmark = needs_fmnist
PHASE_CLASSES = {"phase1": "AdaptPhase", "phase2": "GroupPromptPhase", "phase3": "MoEScorerPhase"}
SPLIT_KEYS = {f"{stage}/{k}" for stage in ("val", "test") for k in ("acc", "acc_many", "acc_medium", "acc_few")}


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    # WandbLogger(offline=True) sets WANDB_MODE for the whole process; monkeypatch restores it.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_QUIET", "true")


def pipeline_config(run_dir, experts):
    """TINY with one epoch per phase, but two in phase 2, which is killed in its second epoch."""
    config = copy.deepcopy(TINY)
    for phase in ("phase1", "phase3"):
        config[phase]["trainer"]["max_epochs"] = 1
    config.update(run_dir=str(run_dir), experts=experts, mixture=len(experts) == 2,
                  wandb=WandbSpec(project="lpt-test", offline=True, log_model=True))
    return config


def check_runs(run_dir, phases, killed):
    import wandb

    wandb.teardown()  # as at the end of the process: wandb's service writes out what it still buffers
    runs = read_offline_runs(run_dir)
    by_phase = {}
    for run in runs:
        by_phase.setdefault(run.job_type, []).append(run)
    assert sorted(by_phase) == sorted(phases)  # job_type = phase; nothing lands in another phase's run
    for phase, attempts in by_phase.items():
        assert {r.id for r in attempts} == {wandb_run_id(run_dir, phase)}, phase
        assert {r.group for r in attempts} == {run_dir.name}
        assert len(attempts) == (2 if phase == killed else 1), phase
        assert [r.exit_code for r in attempts] == [1] * (len(attempts) - 1) + [0]  # finished, also on failure
        final = attempts[-1]
        # Its own resolved config, not another phase's.
        assert final.config["model"]["class_path"].endswith(PHASE_CLASSES[phase.split("_")[0]])
        assert final.config["trainer"]["default_root_dir"] == str(run_dir / phase)
        # Phase 3's val split is the one it fits on: logged as fit_split_val/..., not val/...
        split_keys = {k.replace("val/", "fit_split_val/") for k in SPLIT_KEYS} if phase == "phase3_moe" else SPLIT_KEYS
        assert split_keys <= final.keys()
        # The logged test numbers are those of final.ckpt, as in metrics.json.
        metrics = json.loads((run_dir / phase / "metrics.json").read_text())["results"]
        test_row = metrics["test"] if "test" in metrics else metrics["test: LPT++ (scorer)"]
        logged = [row["test/acc"] for row in final.history if "test/acc" in row][-1]
        assert logged == pytest.approx(test_row["acc"], abs=1e-3)
        per_class = final.table("test/per_class")
        assert per_class["columns"][:4] == ["class", "name", "train_count", "group"] and len(per_class["data"]) == 10
        rows = [r[0] for r in final.table("test/split_accuracy")["data"]]
        if phase == "phase3_moe":
            assert rows == [f"test: {t}" for t in ("visual expert", "vision-language expert", "W_base fusion",
                                                  "LPT++ (scorer)")]
        elif phase.startswith("phase1"):  # the trained expert and where it started
            assert rows == ["test", "test: no training"]
        else:
            assert rows == ["test"]
        assert (f"model-{final.id}", "model", ["final", "latest"]) in final.artifacts
    return by_phase


def steps(run):
    return [row["trainer/global_step"] for row in run.history if "trainer/global_step" in row]


def check_resumed(attempts):
    """The resumed attempt (killed in epoch 1) continues the step axis after epoch 0, not from 0."""
    killed, resumed = attempts
    assert steps(killed) == sorted(steps(killed)) and steps(resumed) == sorted(steps(resumed))
    end_of_epoch0 = max(row["trainer/global_step"] for row in killed.history if "val/acc" in row)
    assert steps(resumed)[0] >= end_of_epoch0 > 0
    assert steps(resumed)[-1] > steps(killed)[-1]


def kill_and_resume(run_dir, config, killer):
    crashing = copy.deepcopy(config)
    crashing["phase2"]["trainer"]["callbacks"] = [killer]
    with pytest.raises(RuntimeError):
        run_pipeline(**crashing)
    run_pipeline(**config)  # the same command again


def evaluate(phase_dir, stage):
    """Split accuracy of the phase's final.ckpt, evaluated on its own."""
    cli = LPTCLI(args=[stage, "--config", str(phase_dir / "config.yaml"), "--ckpt_path", str(phase_dir / "final.ckpt"),
                       "--trainer.logger=false", "--report.enabled=false"], **LPTCLI.defaults())
    return cli.model.results["val" if stage == "validate" else "test"]


def test_lpt_pipeline_requeued_in_phase2_logs_one_wandb_run_per_phase(tmp_path, wandb_offline, monkeypatch):
    for key, value in SLURM_ENV.items():
        monkeypatch.setenv(key, value)
    run_dir = tmp_path / "run"
    # SLURM's time-limit signal inside phase 2: Lightning writes hpc_ckpt_N.ckpt (and fails to
    # requeue: no scontrol here), then the job is killed before the epoch ends.
    kill_and_resume(run_dir, pipeline_config(run_dir, ["visual"]),
                    {"class_path": "pipeline_helpers.SlurmPreemption",
                     "init_args": {"epoch": 1, "signal_batch": 1, "kill_batch": 3}})
    runs = check_runs(run_dir, ["phase1_visual", "phase2_visual"], killed="phase2_visual")
    check_resumed(runs["phase2_visual"])
    # Reported numbers are those of final.ckpt, not of the leftover hpc_ckpt, which is gone.
    phase2 = run_dir / "phase2_visual"
    assert not list(phase2.glob("hpc_ckpt_*.ckpt"))
    reported = json.loads((phase2 / "metrics.json").read_text())["results"]
    for stage, row in (("validate", "val"), ("test", "test")):
        own = evaluate(phase2, stage)
        assert reported[row]["acc"] == pytest.approx(own["acc"], abs=1e-3)
        assert reported[row]["per_class"] == pytest.approx(own["per_class"].tolist(), abs=1e-3)


@pytest.mark.slow
def test_lptpp_pipeline_logs_one_wandb_run_per_phase_with_the_phase3_comparison(tmp_path, wandb_offline):
    run_dir = tmp_path / "run"
    kill_and_resume(run_dir, pipeline_config(run_dir, ["visual", "vl"]),
                    {"class_path": "pipeline_helpers.CrashAt", "init_args": {"epoch": 1, "batch": 1}})
    runs = check_runs(run_dir, ["phase1_visual", "phase2_visual", "phase1_vl", "phase2_vl", "phase3_moe"],
                      killed="phase2_visual")
    check_resumed(runs["phase2_visual"])
