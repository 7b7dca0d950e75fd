"""Checkpoint contents and safe loading.

Phase checkpoints hold only what was trained plus what is needed to rebuild the model: the
frozen backbone is rebuilt from its hub name or local file (recorded in the ``lpt`` metadata),
so a checkpoint is a few MB instead of hundreds.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from lpt_lightning.errors import CheckpointError
from lpt_lightning.models.backbones import BackboneSpec
from lpt_lightning.models.expert import ExpertSpec, GroupPromptSpec

META_KEY = "lpt"
FROZEN_PREFIX = "expert.backbone."


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """torch.load with weights_only=True: no arbitrary code runs while reading a file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: cannot be loaded safely ({type(exc).__name__}: {str(exc).splitlines()[0]}). "
            "It is truncated, corrupt, or carries pickled objects other than tensors and plain data."
        ) from exc


def is_saved_key(key: str) -> bool:
    """Everything but the frozen backbone (and loss helpers rebuilt from class counts)."""
    return (key.startswith("expert.") and not key.startswith(FROZEN_PREFIX)) or key == "class_counts"


def expert_spec_to_dict(spec: ExpertSpec) -> dict[str, Any]:
    return asdict(spec)


def expert_spec_from_dict(data: dict[str, Any]) -> ExpertSpec:
    data = dict(data)
    data["backbone"] = BackboneSpec(**data["backbone"])
    return ExpertSpec(**data)


def group_spec_from_dict(data: dict[str, Any] | None) -> GroupPromptSpec | None:
    return GroupPromptSpec(**data) if data is not None else None


def read_phase_metadata(checkpoint: dict[str, Any], path: str | Path) -> dict[str, Any]:
    meta = checkpoint.get(META_KEY)
    if not isinstance(meta, dict) or "phase" not in meta:
        raise CheckpointError(f"{path}: not an lpt_lightning phase checkpoint (no '{META_KEY}' metadata)")
    return meta
