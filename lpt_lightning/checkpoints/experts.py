"""Trained experts rebuilt from a phase checkpoint: the frozen backbone from the spec in its
metadata (hub name or local file), every trained tensor from its state_dict."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lpt_lightning.checkpoints.metadata import is_saved_key, read_phase_metadata
from lpt_lightning.errors import CheckpointError
from lpt_lightning.models.backbones import BackboneSpec
from lpt_lightning.models.expert import ExpertSpec, GroupPromptSpec, LongTailExpert


def expert_spec_from_dict(data: dict[str, Any], path: str | Path = "checkpoint") -> ExpertSpec:
    try:
        data = dict(data)
        data["backbone"] = BackboneSpec(**data["backbone"])
        return ExpertSpec(**data)
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: malformed expert spec in the metadata ({exc})") from None


def expert_from_specs(info: dict[str, Any], num_classes: int, path: str | Path) -> LongTailExpert:
    """An expert's model from the specs a checkpoint records (``expert``, ``group_prompts``); its
    trained tensors come from a state dict."""
    try:
        group = GroupPromptSpec(**info["group_prompts"]) if info.get("group_prompts") else None
    except TypeError as exc:
        raise CheckpointError(f"{path}: malformed group prompt spec in the metadata ({exc})") from None
    expert = LongTailExpert(expert_spec_from_dict(info["expert"], path), num_classes, group=group)
    expert.release_text_tower()  # the head comes from the checkpoint
    return expert


def expert_from_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> LongTailExpert:
    """Rebuild a trained expert (frozen backbone from its spec, the rest from the checkpoint)."""
    meta = read_phase_metadata(checkpoint, path)
    if "expert" not in meta:
        raise CheckpointError(f"{path}: a '{meta['phase']}' checkpoint holds no single expert")
    expert = expert_from_specs(meta, meta["num_classes"], path)
    prefix = "expert."
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    own = {k: v for k, v in expert.state_dict().items() if is_saved_key(k)}
    missing = sorted(set(own) - set(state))
    if missing:
        raise CheckpointError(f"{path}: lacks {len(missing)} trained tensors (e.g. {prefix}{missing[0]})")
    bad = [k for k in own if state[k].shape != own[k].shape]
    if bad:
        raise CheckpointError(f"{path}: {prefix}{bad[0]} has shape {tuple(state[bad[0]].shape)}, "
                              f"the model expects {tuple(own[bad[0]].shape)}")
    expert.load_state_dict({k: state[k] for k in own}, strict=False)
    return expert
