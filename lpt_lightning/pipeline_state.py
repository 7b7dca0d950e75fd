"""What a pipeline's run directory says about each phase: finished (its final.ckpt loads), the
settings its config.yaml recorded, what a redo deletes, and which checkpoint an interrupted
phase resumes from."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.utilities import rank_zero_info

from lpt_lightning.checkpoints.files import atomic_save, load_checkpoint_file
from lpt_lightning.checkpoints.metadata import read_phase_metadata
from lpt_lightning.errors import CheckpointError, ConfigError
from lpt_lightning.lightning_cli import validate_config
from lpt_lightning.pipeline_plan import PhaseRun


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
                "data.verify_images", "report")
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
