"""``lpt pipeline``: phase 1 and 2 for each expert, then phase 3, each in its own directory.

Every phase is an ordinary ``lpt fit`` run on a config the pipeline composes and writes to
``<run_dir>/<phase>/config.yaml``, so a phase can be rerun or inspected on its own. A finished
phase leaves ``final.ckpt`` (written atomically) and is skipped on rerun if its settings are
those its config.yaml recorded (otherwise the rerun is refused, or redone on request); an
interrupted one resumes from its ``checkpoints/last.ckpt``. Under DDP every rank runs the same sequence (the
launcher re-executes the command line), with a barrier after each hand-over file is written.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from lpt_lightning.checkpoints.files import atomic_save, load_checkpoint_file
from lpt_lightning.checkpoints.metadata import read_phase_metadata
from lpt_lightning.errors import CheckpointError, ConfigError, RunInterrupted
from lpt_lightning.lightning_cli import LPTCLI, validate_config
from lpt_lightning.models.expert import ExpertSpec
from lpt_lightning.phases.moe_scorer import row_name
from lpt_lightning.reports import plot_per_class_accuracy, read_metrics, split_table, write_metrics, write_pictures

PHASE_CLASSES = {
    "phase1": "lpt_lightning.phases.AdaptPhase",
    "phase2": "lpt_lightning.phases.GroupPromptPhase",
    "phase3": "lpt_lightning.phases.MoEScorerPhase",
}


# The sections below are typed, so the pipeline's parser names an unknown key. Their
# trainer/data/model values stay dicts: they are merged into a phase's LightningCLI config, whose
# own parser validates them (Trainer arguments, LongTailDataModule, the phase class's init args)
# when every phase config is checked before anything trains. An expert is typed, so that a config
# can name a piece file for it.
@dataclass(frozen=True)
class ExpertRunArgs:
    """Init args of one expert's run of a phase, merged over the phase's ``model``.

    Attributes:
        expert: the expert (``model.init_args.expert``): a piece file (``expert/visual.yaml``,
            relative to the config naming it) or its fields. Parsed from a config, it has every
            field (the ones it leaves out take ExpertSpec's defaults), so it replaces a
            ``model.expert`` as a whole.
        loss: merged over ``model.loss`` for this expert.
        optim: merged over ``model.optim`` for this expert.
        group_prompts: merged over ``model.group_prompts`` for this expert (phase 2).
    """

    expert: ExpertSpec | None = None
    loss: dict[str, Any] | None = None
    optim: dict[str, Any] | None = None
    group_prompts: dict[str, Any] | None = None


@dataclass(frozen=True)
class PhaseSection:
    """Overrides of one phase, merged over the shared sections.

    Attributes:
        trainer: merged over the shared ``trainer`` section.
        data: merged over the shared ``data`` section.
        model: init args of the phase's LightningModule.
    """

    trainer: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    model: dict[str, Any] | None = None


@dataclass(frozen=True)
class ExpertPhaseSection(PhaseSection):
    """Overrides of a phase run once per expert (phases 1 and 2).

    Attributes:
        visual: init args for the visual expert's run only, merged over ``model``.
        vl: the same for the vision-language expert.
    """

    visual: ExpertRunArgs = ExpertRunArgs()
    vl: ExpertRunArgs = ExpertRunArgs()


PHASE_SECTIONS: dict[str, type[PhaseSection]] = {"phase1": ExpertPhaseSection, "phase2": ExpertPhaseSection,
                                                 "phase3": PhaseSection}


@dataclass
class WandbSpec:
    """Weights & Biases logging of every phase (beside the CSV logs).

    Every phase is a W&B run of its own: runs of one pipeline share a ``group`` (default: the run
    directory's name), each phase is a ``job_type``, and the run id is derived from the run
    directory and the phase, so a requeued or resumed phase keeps appending to the same W&B run.
    ``log_model`` logs each phase's hand-over checkpoint (``final.ckpt``) as a ``model`` artifact
    of its run, with the phase's split accuracies as metadata.
    """

    project: str = "lpt_lightning"
    entity: str | None = None
    group: str | None = None
    tags: list[str] | None = None
    offline: bool = False
    log_model: bool = False


def wandb_run_id(run_dir: Path, phase: str) -> str:
    return hashlib.sha1(f"{run_dir.resolve()}|{phase}".encode()).hexdigest()[:16]


@dataclass
class PhaseRun:
    name: str  # e.g. "phase1_visual"
    phase: str  # "phase1" | "phase2" | "phase3"
    directory: Path
    config: dict[str, Any]

    @property
    def final_checkpoint(self) -> Path:
        return self.directory / "final.ckpt"

    @property
    def last_checkpoint(self) -> Path:
        return self.directory / "checkpoints" / "last.ckpt"


def merge(base: dict[str, Any], override: dict[str, Any] | None) -> dict[str, Any]:
    """Recursive dict merge; lists and scalars in ``override`` replace those in ``base``, and so does
    a dict naming another ``class_path`` (its init args are another class's)."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if (isinstance(value, dict) and isinstance(out.get(key), dict)
                and value.get("class_path", out[key].get("class_path")) == out[key].get("class_path")):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def phase_section(name: str, section: PhaseSection | dict[str, Any] | None) -> PhaseSection:
    """The typed section of phase ``name``; a dict (from Python callers, or the parser's plain
    values) is checked for unknown keys as the pipeline's parser checks a config file."""
    kind = PHASE_SECTIONS[name]
    if isinstance(section, PhaseSection):
        section = {f.name: getattr(section, f.name) for f in fields(section)}
    section = _known_keys(f"pipeline {name}", dict(section or {}), kind)
    for expert in ("visual", "vl"):
        if isinstance(section.get(expert), dict):
            section[expert] = ExpertRunArgs(**_known_keys(f"pipeline {name}.{expert}", section[expert], ExpertRunArgs))
    return kind(**section)


def _known_keys(where: str, values: dict[str, Any], kind: type) -> dict[str, Any]:
    allowed = sorted(f.name for f in fields(kind))
    unknown = set(values) - set(allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; allowed: {allowed}")
    return values


def expert_run_args(args: ExpertRunArgs | None) -> dict[str, Any]:
    """What an expert's block hands to its run: plain data (a phase's config.yaml), unset fields left out."""
    if args is None:
        return {}
    return {f.name: asdict(value) if is_dataclass(value) else value
            for f in fields(args) if (value := getattr(args, f.name)) is not None}


def plan(run_dir: str, data: dict[str, Any], trainer: dict[str, Any] | None, experts: list[str],
         phase1: ExpertPhaseSection | dict[str, Any] | None, phase2: ExpertPhaseSection | dict[str, Any] | None,
         phase3: PhaseSection | dict[str, Any] | None, mixture: bool, seed_everything: int,
         wandb: WandbSpec | None = None, checkpoint_every_n_steps: int | None = None) -> list[PhaseRun]:
    """The phase runs and their composed LightningCLI configs, in execution order."""
    if not experts or len(set(experts)) != len(experts) or not set(experts) <= {"visual", "vl"}:
        raise ConfigError(f"pipeline experts={experts}: choose 'visual', 'vl' or both, each once")
    if mixture and set(experts) != {"visual", "vl"}:
        raise ConfigError("pipeline mixture=true (phase 3) needs both experts; set mixture: false for LPT mode")
    root = Path(run_dir)
    # The images are checked once for the whole pipeline: later phases find the record and skip it.
    # (A parsed data section carries the option's default, None.)
    if data.get("verify_record_dir") is None:
        data = {**data, "verify_record_dir": str(root / "verified")}
    sections = {"phase1": phase_section("phase1", phase1), "phase2": phase_section("phase2", phase2),
                "phase3": phase_section("phase3", phase3)}
    runs: list[PhaseRun] = []

    def add(phase: str, name: str, model_args: dict[str, Any], expert: str | None) -> None:
        section = sections[phase]
        directory = root / name
        phase_trainer = merge(trainer or {}, section.trainer)
        callbacks = list(phase_trainer.get("callbacks") or [])
        callbacks.append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                          "init_args": {"dirpath": str(directory / "checkpoints"), "save_last": "link",
                                        "save_top_k": 1, "every_n_train_steps": checkpoint_every_n_steps}})
        phase_trainer["callbacks"] = callbacks
        phase_trainer["default_root_dir"] = str(directory)
        if phase_trainer.get("logger") is None:  # unset (the parser gives every Trainer argument)
            loggers = [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                        "init_args": {"save_dir": str(directory), "name": "logs"}}]
            if wandb is not None:
                loggers.append({
                    "class_path": "lpt_lightning.reports.PhaseWandbLogger",
                    "init_args": {"project": wandb.project, "name": f"{root.name}/{name}", "save_dir": str(directory),
                                  "id": wandb_run_id(root, name), "offline": wandb.offline},
                    "dict_kwargs": {"group": wandb.group or root.name, "job_type": name, "tags": wandb.tags,
                                    "entity": wandb.entity, "resume": "allow"},
                })
            phase_trainer["logger"] = loggers
        init_args = merge(merge(section.model or {}, expert_run_args(getattr(section, expert)) if expert else None),
                          model_args)
        config = {
            "seed_everything": seed_everything,
            "trainer": phase_trainer,
            "model": {"class_path": PHASE_CLASSES[phase], "init_args": init_args},
            "data": merge(data, section.data),
        }
        runs.append(PhaseRun(name, phase, directory, config))

    for expert in experts:
        add("phase1", f"phase1_{expert}", {}, expert)
        add("phase2", f"phase2_{expert}", {"phase1_checkpoint": str(root / f"phase1_{expert}" / "final.ckpt")},
            expert)
    if mixture:
        add("phase3", "phase3_moe", {"visual_checkpoint": str(root / "phase2_visual" / "final.ckpt"),
                                     "vl_checkpoint": str(root / "phase2_vl" / "final.ckpt")}, None)
    return runs


def finished(run: PhaseRun) -> bool:
    """A phase is done when its final checkpoint loads; a corrupt one means redo the phase."""
    if not run.final_checkpoint.is_file():
        return False
    try:
        read_phase_metadata(load_checkpoint_file(run.final_checkpoint), run.final_checkpoint)
    except CheckpointError as exc:
        rank_zero_info(f"{run.name}: {exc}; redoing this phase")
        return False
    return True


# Settings that do not change a phase's weights: a finished phase is kept whatever their values.
SAME_WEIGHTS = ("trainer.logger", "trainer.enable_progress_bar", "trainer.enable_model_summary",
                "trainer.log_every_n_steps", "data.num_workers", "data.pin_memory", "data.persistent_workers",
                "data.verify_images")
_UNSET = object()


def write_phase_config(run: PhaseRun, path: Path) -> None:
    text = yaml.safe_dump(run.config, sort_keys=False)
    atomic_save(lambda tmp: tmp.write_text(text), path)  # ranks may write it at once


def _validate_configs(runs: list[PhaseRun], keep: set[str] = frozenset()) -> None:
    """Parse every phase's config before anything trains: a typo fails now, not hours later. Each
    is written to the phase's config.yaml, except in the phases named in ``keep``, whose config.yaml
    records the settings of their final.ckpt: theirs is checked from a file of its own."""
    for run in runs:
        run.directory.mkdir(parents=True, exist_ok=True)
        path = run.directory / (f".config.new-{os.getpid()}.yaml" if run.name in keep else "config.yaml")
        write_phase_config(run, path)
        try:
            validate_config(str(path))
        except ConfigError as exc:
            raise ConfigError(f"pipeline phase {run.name}: {exc}") from None
        finally:
            if run.name in keep:
                path.unlink(missing_ok=True)


def recorded_changes(run: PhaseRun) -> list[str]:
    """How the phase's settings differ from those its config.yaml recorded when its final.ckpt was
    trained, one ``key: recorded -> now`` line each (settings in SAME_WEIGHTS left out); empty if none."""
    path = run.directory / "config.yaml"
    try:
        recorded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [f"{path} is missing: the settings of its final.ckpt are unknown"]
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        return [f"{path} cannot be read ({exc}): the settings of its final.ckpt are unknown"]
    current = yaml.safe_load(yaml.safe_dump(run.config, sort_keys=False))  # as it would be recorded
    return [f"{key}: {_shown(old)} -> {_shown(new)}" for key, old, new in _differences(recorded, current)
            if not any(key == k or key.startswith(k + ".") for k in SAME_WEIGHTS)]


def _differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for key in [*old, *(k for k in new if k not in old)]
                for d in _differences(old.get(key, _UNSET), new.get(key, _UNSET), f"{prefix}{key}.")]
    return [] if old == new else [(prefix.rstrip("."), old, new)]


def _shown(value: Any) -> str:
    text = "(unset)" if value is _UNSET else yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    text = text.removesuffix("\n...").removesuffix("...").strip()
    return text if len(text) <= 80 else text[:77] + "..."


def discard_phase(run: PhaseRun) -> None:
    """What a phase run left that a redo must not reuse: its hand-over file, the checkpoints it would
    resume from, its reports."""
    stale = [run.final_checkpoint, run.directory / "metrics.json", run.directory / "per_class_accuracy.png",
             *run.last_checkpoint.parent.glob("*.ckpt"), *run.directory.glob("hpc_ckpt_*.ckpt")]
    removed = [p for p in stale if p.is_file() or p.is_symlink()]
    for p in removed:
        p.unlink(missing_ok=True)  # every rank may try
    if removed:
        rank_zero_info(f"{run.name}: --redo_from: deleted {len(removed)} files of its earlier run")


def resume_checkpoint(run: PhaseRun) -> Path | None:
    """The newest readable checkpoint of an interrupted phase: the epoch checkpoint
    (``checkpoints/last.ckpt``) or a mid-epoch one Lightning wrote on SLURM's pre-emption signal
    (``hpc_ckpt_N.ckpt``). An unreadable one is reported and passed over."""
    candidates = [run.last_checkpoint, *run.directory.glob("hpc_ckpt_*.ckpt")]
    existing = sorted((p for p in candidates if p.is_file()), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in existing:
        try:
            load_checkpoint_file(path)
            return path
        except CheckpointError as exc:
            rank_zero_info(f"{run.name}: {exc}; trying an older checkpoint")
    return None


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
    report_phase(run, cli.trainer, cli.model, cli.datamodule, test, test)


def report_phase(run: PhaseRun, trainer, model, datamodule, test: bool, test_start: bool,
                 log_model: bool = False) -> None:
    """Evaluate the phase's hand-over weights (and phase 1's start) and write its reports."""
    # Every reported number is computed from the hand-over weights, read back from final.ckpt:
    # without a ckpt_path Lightning would load a leftover hpc_ckpt_N.ckpt under SLURM, and the
    # last validation of fit may predate a resume.
    final = str(run.final_checkpoint)
    model.results.clear()
    trainer.validate(model, datamodule=datamodule, ckpt_path=final, verbose=False)
    if test and datamodule.splits.test is not None:
        trainer.test(model, datamodule=datamodule, ckpt_path=final, verbose=False)
    results = dict(model.results)
    if run.phase == "phase1":
        results |= _start_rows(run, trainer, model, datamodule, test_start)
    if trainer.is_global_zero:
        write_metrics(run.directory / "metrics.json", results, model.class_counts.cpu(), model.class_names,
                      model.split_convention)
        test_rows = {k: v for k, v in results.items() if k.startswith("test")} or results
        plot_per_class_accuracy(run.directory / "per_class_accuracy.png", test_rows, model.class_counts.cpu(),
                                f"{run.name}: per-class accuracy vs training count")
        write_pictures(run.directory, test_rows, model.class_names)
        rank_zero_info(f"\n{run.name} ({run.directory})\n{split_table(results, model.class_names)}\n")
        if log_model:
            log_final_checkpoint(trainer, run, results)
    trainer.strategy.barrier("lpt-pipeline-reported")


def _start_rows(run: PhaseRun, trainer, model, datamodule, test: bool) -> dict[str, dict[str, Any]]:
    """The no-training rows of phase 1: its expert as it stood before the first step (the VL head
    at its class-name text embeddings, the visual head at its initialisation), read back from
    ``start.ckpt`` like every other reported number."""
    start = run.directory / "start.ckpt"
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
                seed_everything, wandb, checkpoint_every_n_steps)
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
    if write_summary(Path(run_dir), runs) and rank_zero_only.rank == 0:  # rank 0 wrote the file
        summary = Path(run_dir) / "metrics.json"
        rank_zero_info(f"\npipeline summary ({summary})\n{split_table_from_file(summary)}\n")
    return runs


EXPERT_TITLES = {"visual": "visual expert", "vl": "vision-language expert"}


def summary_rows(runs: list[PhaseRun]) -> dict[str, dict[str, Any]]:
    """Every evaluated row of the pipeline, in the order of training: each expert before training,
    after phase 1 and after phase 2, then the fusions. Read from the phases' metrics.json files
    (per-class accuracies included); a phase that was not evaluated on a split has no row there."""
    phases: dict[str, dict[str, Any]] = {}
    for run in runs:
        path = run.directory / "metrics.json"
        if path.is_file():
            phases[run.name] = json.loads(path.read_text())
    phase3 = phases.get("phase3_moe", {}).get("results", {})
    rows: dict[str, dict[str, Any]] = {}
    for split in ("test", "val"):
        for expert, title in EXPERT_TITLES.items():
            for name, source, label in ((f"phase1_{expert}", f"{split}: no training", "no training"),
                                        (f"phase1_{expert}", split, "phase 1"),
                                        (f"phase2_{expert}", split, "phase 2")):
                row = phases.get(name, {}).get("results", {}).get(source)
                if row is None and label == "phase 2":  # phase 3 evaluated the phase-2 experts
                    row = phase3.get(row_name(split, title))
                if row is not None:
                    rows[f"{split}: {title}, {label}"] = row
        # Phase 3's val rows keep their name: the fusions were fitted on that split.
        for title in ("W_base fusion", "LPT++ (scorer)"):
            row = phase3.get(row_name(split, title))
            if row is not None:
                rows[row_name(split, title)] = row
    return rows


def write_summary(run_dir: Path, runs: list[PhaseRun]) -> dict[str, dict[str, Any]]:
    """``<run_dir>/metrics.json``: the pipeline's rows (``summary_rows``), on rank 0."""
    rows = summary_rows(runs)
    if not rows or rank_zero_only.rank != 0:
        return rows
    first = json.loads(next(r.directory / "metrics.json" for r in runs
                            if (r.directory / "metrics.json").is_file()).read_text())
    payload = {k: first[k] for k in ("split_convention", "class_counts", "class_names")} | {
        "phases": {r.name: str(r.directory.relative_to(run_dir)) for r in runs}, "results": rows}
    atomic_save(lambda tmp: tmp.write_text(json.dumps(payload, indent=1)), run_dir / "metrics.json")
    return rows


def split_table_from_file(path: Path) -> str:
    return split_table(read_metrics(path), json.loads(path.read_text()).get("class_names"))
