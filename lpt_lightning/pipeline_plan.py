"""``lpt pipeline``'s plan: the typed config sections and the phase runs they compose, each an
``lpt fit`` config for its own directory, in execution order."""
from __future__ import annotations

import copy
import hashlib
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

from lpt_lightning.errors import ConfigError
from lpt_lightning.models.expert import ExpertSpec
from lpt_lightning.test_priors import imbalance_factors

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
         wandb: WandbSpec | None = None, checkpoint_every_n_steps: int | None = None,
         test_priors: bool | list[float] = False) -> list[PhaseRun]:
    """The phase runs and their composed LightningCLI configs, in execution order."""
    if not experts or len(set(experts)) != len(experts) or not set(experts) <= {"visual", "vl"}:
        raise ConfigError(f"pipeline experts={experts}: choose 'visual', 'vl' or both, each once")
    if mixture and set(experts) != {"visual", "vl"}:
        raise ConfigError("pipeline mixture=true (phase 3) needs both experts; set mixture: false for LPT mode")
    imbalance_factors(test_priors, where="pipeline test_priors")  # a bad value named before anything runs
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
        if test_priors:  # left out when off: config.yaml stays as before
            config["report"] = {"test_priors": test_priors}
        runs.append(PhaseRun(name, phase, directory, config))

    for expert in experts:
        add("phase1", f"phase1_{expert}", {}, expert)
        add("phase2", f"phase2_{expert}", {"phase1_checkpoint": str(root / f"phase1_{expert}" / "final.ckpt")},
            expert)
    if mixture:
        add("phase3", "phase3_moe", {"visual_checkpoint": str(root / "phase2_visual" / "final.ckpt"),
                                     "vl_checkpoint": str(root / "phase2_vl" / "final.ckpt")}, None)
    return runs
