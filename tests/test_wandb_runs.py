"""`lpt pipeline` with W&B in offline mode, read back from the run files: one run per phase, a
killed and resumed phase appending to its own run, the reports of every phase's final weights."""
import copy
import json

import pytest

from lpt_lightning.pipeline import WandbSpec, run_pipeline, wandb_run_id
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


def pipeline_config(run_dir, experts, phase2_epochs=2):
    config = copy.deepcopy(TINY)
    for phase in ("phase1", "phase3"):
        config[phase]["trainer"]["max_epochs"] = 1
    config["phase2"]["trainer"]["max_epochs"] = phase2_epochs
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
        assert SPLIT_KEYS <= final.keys()
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
        else:
            assert rows == ["test"]
        assert (f"model-{final.id}", "model", ["final", "latest"]) in final.artifacts
    return by_phase


def steps(run):
    return [row["trainer/global_step"] for row in run.history if "trainer/global_step" in row]


def check_resumed(attempts):
    """The resumed attempt continues the step axis where the checkpoint left it, never from 0."""
    killed, resumed = attempts
    assert steps(killed) == sorted(steps(killed)) and steps(resumed) == sorted(steps(resumed))
    assert 0 < steps(resumed)[0] <= steps(killed)[-1] + 1
    assert steps(resumed)[-1] > steps(killed)[-1]


def kill_and_resume(run_dir, config):
    crashing = copy.deepcopy(config)
    crashing["phase2"]["trainer"]["callbacks"] = [{"class_path": "pipeline_helpers.CrashAt",
                                                   "init_args": {"epoch": 1, "batch": 1}}]
    with pytest.raises(RuntimeError, match="simulated node failure"):
        run_pipeline(**crashing)
    run_pipeline(**config)


def test_lpt_pipeline_logs_one_wandb_run_per_phase_and_resumes_into_it(tmp_path, wandb_offline):
    run_dir = tmp_path / "run"
    kill_and_resume(run_dir, pipeline_config(run_dir, ["visual"]))
    runs = check_runs(run_dir, ["phase1_visual", "phase2_visual"], killed="phase2_visual")
    check_resumed(runs["phase2_visual"])


@pytest.mark.slow
def test_lptpp_pipeline_logs_one_wandb_run_per_phase_with_the_phase3_comparison(tmp_path, wandb_offline):
    run_dir = tmp_path / "run"
    kill_and_resume(run_dir, pipeline_config(run_dir, ["visual", "vl"]))
    runs = check_runs(run_dir, ["phase1_visual", "phase2_visual", "phase1_vl", "phase2_vl", "phase3_moe"],
                      killed="phase2_visual")
    check_resumed(runs["phase2_visual"])
