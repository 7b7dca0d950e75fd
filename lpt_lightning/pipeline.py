"""``lpt pipeline``: phase 1 and 2 for each expert, then phase 3, each in its own directory.

Every phase is an ordinary ``lpt fit`` run on a config the pipeline composes and writes to
``<run_dir>/<phase>/config.yaml``, so a phase can be rerun or inspected on its own. A finished
phase leaves ``final.ckpt`` (written atomically) and is skipped on rerun if its settings are
those its config.yaml recorded (otherwise the rerun is refused, or redone on request); an
interrupted one resumes from its ``checkpoints/last.ckpt``. Under DDP every rank runs the same sequence (the
launcher re-executes the command line), with a barrier after each hand-over file is written.

This file runs the phases; the plan (typed sections, composed configs) is in `pipeline_plan`,
what a run directory holds in `pipeline_state`, the summary in `pipeline_summary`.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from lpt_lightning.errors import ConfigError, RunInterrupted
from lpt_lightning.lightning_cli import LPTCLI
from lpt_lightning.phases.moe_scorer import ROWS, STAGE_ROWS, row_name
from lpt_lightning.pipeline_plan import ExpertPhaseSection, PhaseRun, PhaseSection, WandbSpec, plan
from lpt_lightning.pipeline_state import (
    _validate_configs,
    discard_phase,
    finished,
    recorded_changes,
    resume_checkpoint,
    write_phase_config,
)
from lpt_lightning.pipeline_summary import split_table_from_file, write_summary
from lpt_lightning.reports import (
    CHECKPOINT_DIGEST_KEY,
    file_digest,
    plot_per_class_accuracy,
    split_table,
    supercategories_of,
    write_metrics,
    write_pictures,
)


def run_phase(run: PhaseRun, test: bool, log_model: bool = False, test_start: bool | None = None) -> None:
    """``lpt fit`` on the phase's config, then the hand-over file and the reports of its weights.

    Phase 1 also reports its expert before training (rows ``val: no training``, ``test: no
    training``; the test row when ``test_start``, default ``test``), so every table shows where
    the long-tailed training started.

    The W&B run of the phase (if any) is finished when the phase ends, also on failure, so the next
    phase starts a run of its own instead of writing into this one.
    """
    # A run still active in this process would be reused by Lightning's WandbLogger for this phase.
    finish_wandb_run(exit_code=0)
    succeeded = False
    try:
        _fit_and_report(run, test, log_model, test if test_start is None else test_start)
        succeeded = True
    finally:
        finish_wandb_run(exit_code=0 if succeeded else 1)


def finish_wandb_run(exit_code: int) -> None:
    wandb = sys.modules.get("wandb")  # imported only when a WandbLogger was built
    if wandb is not None and wandb.run is not None:
        wandb.run.finish(exit_code=exit_code)


def _fit_and_report(run: PhaseRun, test: bool, log_model: bool, test_start: bool) -> None:
    args = ["--config", str(run.directory / "config.yaml")]
    resume = resume_checkpoint(run)
    if resume is not None:
        rank_zero_info(f"{run.name}: resuming from {resume}")
        args += ["--ckpt_path", str(resume)]
    else:  # nothing readable to resume: whatever checkpoints are left are unusable, start afresh
        args += ["--overwrite=true"]
    cli = LPTCLI(args=["fit", *args], **LPTCLI.defaults())
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    if trainer.interrupted:
        raise SystemExit(f"{run.name}: interrupted; rerun the pipeline to resume from its last checkpoint")
    # Hand-over file: written under a temporary name, then renamed (never half-written).
    tmp = run.final_checkpoint.with_name(".final.ckpt.tmp")
    trainer.save_checkpoint(tmp, weights_only=False)
    if trainer.is_global_zero:
        os.replace(tmp, run.final_checkpoint)
        remove_preemption_checkpoints(run)
    trainer.strategy.barrier("lpt-pipeline-handover")
    report_phase(run, trainer, model, datamodule, test, test_start, log_model)


def reevaluate_phase(run: PhaseRun, test: bool = True) -> None:
    """The reports of a finished phase written again from its ``final.ckpt``, without training
    (e.g. to add metrics that did not exist when it ran)."""
    cli = LPTCLI(args=["--config", str(run.directory / "config.yaml")], run=False, **LPTCLI.defaults())
    report_phase(run, cli.trainer, cli.model, cli.datamodule, test, test, keep_start=True)


def test_with_augmentation(run: PhaseRun, augment: str) -> None:
    """The phase's test rows from ``final.ckpt`` again, each expert averaging its probabilities over
    the ``augment`` views of every image, into ``test_time_<augment>.json`` (the phase's own reports
    and W&B run untouched); kept while newer than final.ckpt."""
    path = run.directory / f"test_time_{augment}.json"
    if path.is_file() and path.stat().st_mtime >= run.final_checkpoint.stat().st_mtime:
        return
    args = ["--config", str(run.directory / "config.yaml"), f"--data.test_time.augment={augment}",
            "--trainer.logger=false", "--report.enabled=false"]
    cli = LPTCLI(args=args, run=False, **LPTCLI.defaults())
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    model.results.clear()
    trainer.test(model, datamodule=datamodule, ckpt_path=str(run.final_checkpoint), verbose=False)
    if trainer.is_global_zero:
        write_metrics(path, dict(model.results), model.class_counts.cpu(), model.class_names, model.split_convention)
    trainer.strategy.barrier("lpt-pipeline-test-time")


def report_phase(run: PhaseRun, trainer, model, datamodule, test: bool, test_start: bool,
                 log_model: bool = False, keep_start: bool = False) -> None:
    """Evaluate the phase's hand-over weights (and phase 1's start) and write its reports;
    ``keep_start``: evaluate an existing start.ckpt as it is (its digest stays the reported one)."""
    # Every reported number is computed from the hand-over weights, read back from final.ckpt:
    # without a ckpt_path Lightning would load a leftover hpc_ckpt_N.ckpt under SLURM, and the
    # last validation of fit may predate a resume.
    final = str(run.final_checkpoint)
    model.results.clear()
    trainer.validate(model, datamodule=datamodule, ckpt_path=final, verbose=False)
    if test and datamodule.splits.test is not None:
        trainer.test(model, datamodule=datamodule, ckpt_path=final, verbose=False)
    results = dict(model.results)
    checkpoint_of = dict.fromkeys(results, run.final_checkpoint)
    if run.phase == "phase1":
        start_rows = _start_rows(run, trainer, model, datamodule, test_start, keep_start)
        checkpoint_of |= {row: run.directory / "start.ckpt" for row in start_rows if row not in results}
        results |= start_rows
    if run.phase == "phase3":  # its expert rows are the weights of the phase-2 checkpoints it read
        for kind, info in model.expert_info.items():
            source = Path(info["source"])
            for row in (row_name(stage, ROWS[kind]) for stage in STAGE_ROWS):
                if row in results:
                    checkpoint_of[row] = source if source.is_file() else None
    if trainer.is_global_zero:
        digest = {path: file_digest(path) for path in set(checkpoint_of.values()) if path is not None}
        results = {row: v | {CHECKPOINT_DIGEST_KEY: digest.get(checkpoint_of[row])} for row, v in results.items()}
        test_split = datamodule.splits.test
        digests = {"held_out_digest": (model.data_record or {}).get("val"),
                   "test_digest": test_split.digest() if test_split is not None else None}
        write_metrics(run.directory / "metrics.json", results, model.class_counts.cpu(), model.class_names,
                      model.split_convention, digests)
        test_rows = {k: v for k, v in results.items() if k.startswith("test")} or results
        plot_per_class_accuracy(run.directory / "per_class_accuracy.png", test_rows, model.class_counts.cpu(),
                                f"{run.name}: per-class accuracy vs training count", supercategories_of(model))
        write_pictures(run.directory, test_rows, model.class_names)
        rank_zero_info(f"\n{run.name} ({run.directory})\n{split_table(results, model.class_names)}\n")
        if log_model:
            log_final_checkpoint(trainer, run, results)
    trainer.strategy.barrier("lpt-pipeline-reported")


def _start_rows(run: PhaseRun, trainer, model, datamodule, test: bool, keep: bool = False) -> dict[str, dict[str, Any]]:
    """The no-training rows of phase 1: its expert as it stood before the first step (the VL head
    at its class-name text embeddings, the visual head at its initialisation), read back from
    ``start.ckpt`` like every other reported number."""
    start = run.directory / "start.ckpt"
    if not (keep and start.is_file()):
        model.load_start_state()
        tmp = start.with_name(".start.ckpt.tmp")
        trainer.save_checkpoint(tmp, weights_only=True)
        if trainer.is_global_zero:
            os.replace(tmp, start)
        trainer.strategy.barrier("lpt-pipeline-start-row")
    # The trained rows stay in model.results, so the test reports (per-class table, W&B tables)
    # show the trained model and its start side by side instead of the start alone.
    model.eval_row = "no training"
    try:
        trainer.validate(model, datamodule=datamodule, ckpt_path=str(start), verbose=False)
        if test and datamodule.splits.test is not None:
            trainer.test(model, datamodule=datamodule, ckpt_path=str(start), verbose=False)
    finally:
        model.eval_row = ""
    return dict(model.results)


def remove_preemption_checkpoints(run: PhaseRun) -> None:
    """A finished phase needs no ``hpc_ckpt_N.ckpt``: left behind, Lightning would load one under
    SLURM wherever no checkpoint path is given (``lpt test`` in that directory, for one)."""
    for path in run.directory.glob("hpc_ckpt_*.ckpt"):
        path.unlink(missing_ok=True)


def log_final_checkpoint(trainer, run: PhaseRun, results: dict[str, dict[str, Any]]) -> None:
    """``final.ckpt`` as a W&B ``model`` artifact of the phase's run, so a dashboard number links
    to the weights that produced it."""
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    from lpt_lightning.metrics import HEADLINE_KEYS

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            metadata = {"phase": run.name, **{f"{row}/{k}": v[k] for row, v in results.items() for k in HEADLINE_KEYS}}
            artifact = wandb.Artifact(f"model-{logger.version}", type="model", metadata=metadata)
            artifact.add_file(str(run.final_checkpoint), name="final.ckpt")
            logger.experiment.log_artifact(artifact, aliases=["latest", "final"])


def run_pipeline(
    run_dir: str,
    data: dict[str, Any],
    trainer: dict[str, Any] | None = None,
    experts: list[Literal["visual", "vl"]] | None = None,
    phase1: ExpertPhaseSection = ExpertPhaseSection(),
    phase2: ExpertPhaseSection = ExpertPhaseSection(),
    phase3: PhaseSection = PhaseSection(),
    mixture: bool = True,
    test: bool | Literal["final"] = True,
    seed_everything: int = 0,
    devices: int | str | None = None,
    num_nodes: int | None = None,
    num_workers: int | None = None,
    wandb: WandbSpec | None = None,
    checkpoint_every_n_steps: int | None = None,
    redo_from: str | None = None,
    test_priors: bool | list[float] = False,
    test_time_rows: list[Literal["flip", "five_crop", "ten_crop"]] | None = None,
) -> list[PhaseRun]:
    """Run LPT++ end to end.

    From Python, a phase section may also be given as a dict with the keys of its dataclass.

    Args:
        run_dir: directory of the whole run; each phase writes to ``<run_dir>/<phase>``.
        data: the ``data`` section shared by all phases (a LongTailDataModule config).
        trainer: the ``trainer`` section shared by all phases.
        experts: which experts to train: ``[visual, vl]`` (LPT++) or ``[visual]`` (LPT).
        phase1: per-phase overrides: ``trainer``, ``data``, ``model`` (init args of AdaptPhase for
            every expert) and ``visual`` / ``vl`` (init args for one expert).
        phase2: the same for GroupPromptPhase.
        phase3: the same for MoEScorerPhase (``trainer``, ``data``, ``model``).
        mixture: run phase 3 (needs both experts); false = LPT mode.
        test: evaluate each phase on the test split after training; ``final`` only the phases
            whose models are the result (phase 3, or phase 2 of each expert without a mixture):
            phase 3's table repeats each phase-2 expert's test accuracy, and a large test split
            then costs one pass instead of five.
        seed_everything: global seed of every phase.
        devices: overrides ``trainer.devices`` of every phase (e.g. from a SLURM script).
        num_nodes: overrides ``trainer.num_nodes`` of every phase.
        num_workers: overrides ``data.num_workers`` of every phase (e.g. from the cores a SLURM
            task has).
        wandb: log every phase to Weights & Biases as well.
        checkpoint_every_n_steps: also checkpoint every N training steps (long epochs: a killed
            job then loses at most N steps); None = at the end of every epoch only.
        redo_from: a phase run (phase1_visual, phase2_visual, phase1_vl, phase2_vl, phase3_moe) to
            train again, with every run after it, deleting their checkpoints and reports. A rerun
            keeps a finished phase only if its settings are those recorded in its config.yaml
            (logging, progress display, loader workers aside); otherwise it is refused, naming the
            settings that differ.
        test_priors: also report every row under forward / backward long-tailed test distributions
            of these imbalance factors (true: 2, 5, 10, 25, 50), without and with post-hoc logit
            adjustment (tau chosen on the val split): each row's ``test_priors`` block in the
            metrics.json files, ``<run_dir>/test_priors.png`` (`lpt_lightning.test_priors`). Phases
            finished before it was set keep their reports (``--redo_from`` evaluates them again).
        test_time_rows: also test the tested phases' weights with these test-time augmentations
            (`lpt_lightning.data.transforms.TestTimeSpec`) and show their rows beside the others,
            named ``test (flip): ...``; each kept in ``<phase>/test_time_<augment>.json``.
    """
    trainer = dict(trainer or {})
    if devices is not None:
        trainer["devices"] = devices
    if num_nodes is not None:
        trainer["num_nodes"] = num_nodes
    if num_workers is not None:
        data = dict(data, num_workers=num_workers)
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"run_dir={run_dir} cannot be created ({exc}); choose a writable directory") from None
    if not os.access(run_dir, os.W_OK):
        raise ConfigError(f"run_dir={run_dir} is not writable; choose a writable directory")
    runs = plan(run_dir, data, trainer, list(experts or ["visual", "vl"]), phase1, phase2, phase3, mixture,
                seed_everything, wandb, checkpoint_every_n_steps, test_priors)
    names = [run.name for run in runs]
    if redo_from is not None and redo_from not in names:
        raise ConfigError(f"--redo_from={redo_from}: not a phase of this pipeline; choose one of {', '.join(names)}")
    redo = set(names[names.index(redo_from):] if redo_from else [])
    done = {run.name for run in runs if finished(run)}
    changed = {run.name: lines for run in runs if run.name in done - redo and (lines := recorded_changes(run))}
    _validate_configs(runs, keep=set(changed) | (done & redo))
    if changed:
        first = names[min(names.index(n) for n in changed)]
        shown = "\n".join(f"{name} ({run_dir}/{name}/config.yaml):\n  " + "\n  ".join(changed[name])
                          for name in names if name in changed)
        raise ConfigError(
            f"finished phases in run_dir={run_dir} were trained with other settings (recorded -> now):\n{shown}\n"
            f"rerun with the recorded settings to keep them, write to a new run_dir, or pass --redo_from={first} "
            f"to train {first} and every phase after it again (deletes their checkpoints)")
    for run in runs:
        if run.name in redo:
            discard_phase(run)
            write_phase_config(run, run.directory / "config.yaml")
    done -= redo
    tested_phase = "phase3" if mixture else "phase2"
    for run in runs:
        if run.name in done:
            rank_zero_info(f"{run.name}: finished earlier ({run.final_checkpoint}), skipping")
            remove_preemption_checkpoints(run)
            metrics = run.directory / "metrics.json"
            if metrics.is_file():
                rank_zero_info(f"{run.name}\n{split_table_from_file(metrics)}\n")
            continue
        rank_zero_info(f"=== {run.name} ===")
        try:
            run_phase(run, test is True or (test == "final" and run.phase == tested_phase),
                      log_model=wandb is not None and wandb.log_model, test_start=test is not False)
        except (KeyboardInterrupt, RunInterrupted) as exc:
            raise RunInterrupted(f"interrupted in phase {run.name}; rerun the same command to resume",
                                 getattr(exc, "exit_code", 130)) from None
    for run in runs:
        if run.phase == tested_phase and test is not False:
            for augment in test_time_rows or []:
                test_with_augmentation(run, augment)
    if write_summary(Path(run_dir), runs) and rank_zero_only.rank == 0:  # rank 0 wrote the file
        summary = Path(run_dir) / "metrics.json"
        rank_zero_info(f"\npipeline summary ({summary})\n{split_table_from_file(summary)}\n")
    return runs
