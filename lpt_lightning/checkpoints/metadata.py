"""The ``lpt`` metadata every phase checkpoint carries, and the checks made on it: which phase
wrote it, for how many classes, on which data, and which tensors a checkpoint keeps."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lpt_lightning.errors import CheckpointError, ConfigError

META_KEY = "lpt"
PHASE_NUMBERS = {"adapt": "phase 1", "group_prompt": "phase 2", "moe_scorer": "phase 3"}


def is_saved_key(key: str) -> bool:
    """Everything but frozen backbones (and loss helpers, which are rebuilt from class counts)."""
    return "backbone." not in key and not key.startswith("stream_losses.")


def read_phase_metadata(checkpoint: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The ``lpt`` metadata, after checking the checkpoint has the shape every phase relies on."""
    meta = checkpoint.get(META_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(meta, dict) or "phase" not in meta:
        raise CheckpointError(f"{path}: not an lpt_lightning phase checkpoint (no '{META_KEY}' metadata)")
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: its state_dict is missing or holds something other than tensors")
    if not isinstance(meta.get("num_classes"), int) or meta["num_classes"] < 1:
        raise CheckpointError(f"{path}: metadata lacks a valid num_classes")
    if meta["phase"] in ("adapt", "group_prompt") and not isinstance(meta.get("expert"), dict):
        raise CheckpointError(f"{path}: metadata of a '{meta['phase']}' checkpoint lacks its expert spec")
    return meta


def check_phase_metadata(meta: dict[str, Any], path: str | Path, option: str, phase: str | None = None,
                         num_classes: int | None = None) -> None:
    """Refuse a checkpoint of another phase than ``phase`` or for another class count (None: not
    checked). ``option`` is the setting that named the file, quoted in the message."""
    if phase is not None and meta["phase"] != phase:
        raise CheckpointError(f"{option}={path}: written by phase '{meta['phase']}', expected a checkpoint of "
                              f"phase '{phase}' ({PHASE_NUMBERS.get(phase, phase)})")
    if num_classes is not None and meta["num_classes"] != num_classes:
        raise ConfigError(f"{option}={path}: trained for {meta['num_classes']} classes, but the data has {num_classes}")


def check_same_data(recorded: dict[str, Any] | None, current: dict[str, Any] | None, what: str) -> None:
    """Refuse an upstream checkpoint trained on other data than this phase's: another training
    split, or another held-out split (whose images may then have been trained on)."""
    if current is None:
        return
    if not isinstance(recorded, dict) or "train" not in recorded:
        raise CheckpointError(
            f"{what}: the checkpoint records no training data, so nothing shows that this phase's held-out images "
            "were kept out of its training set; retrain it with this version of lpt_lightning")
    if recorded["train"] != current["train"]:
        raise CheckpointError(
            f"{what}: trained on another training split (digest {recorded['train']}, {recorded.get('num_train')} "
            f"images) than this phase's data (digest {current['train']}, {current.get('num_train')} images): "
            "use the same data section (source, long-tail settings, data.holdout_*) in every phase")
    if recorded.get("val") != current.get("val") or recorded.get("holdout") != current.get("holdout"):
        raise CheckpointError(
            f"{what}: trained with another held-out split ({recorded.get('holdout') or 'the dataset val split'}, "
            f"digest {recorded.get('val')}) than this phase's ({current.get('holdout') or 'the dataset val split'}, "
            f"digest {current.get('val')}): use the same data.holdout_* settings in every phase")
