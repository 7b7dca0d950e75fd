"""Phase 3's two frozen experts, built whole: from their phase-2 files, or from the specs a phase-3
checkpoint or LPT++ export records (their trained tensors then come from its state dict)."""
from __future__ import annotations

from typing import Any

from lpt_lightning.checkpoints.experts import expert_from_checkpoint, expert_from_specs
from lpt_lightning.checkpoints.files import load_checkpoint_file
from lpt_lightning.checkpoints.metadata import read_phase_metadata
from lpt_lightning.errors import CheckpointError, ConfigError
from lpt_lightning.expert_outputs import expert_digest
from lpt_lightning.models.expert import LongTailExpert

EXPERTS = ("visual", "vl")


def architecture(info: dict[str, Any]) -> dict[str, Any]:
    """What defines an expert's model (its specs and logit scale), as recorded in checkpoints."""
    return {k: info.get(k) for k in ("expert", "group_prompts", "logit_scale")}


def experts_from_phase2(checkpoints: dict[str, str | None], num_classes: int
                        ) -> tuple[dict[str, LongTailExpert], dict[str, dict[str, Any]]]:
    """Both experts from their phase-2 files, and what a phase-3 checkpoint records of each (specs,
    logit scale, source, training data, digest of its trained tensors)."""
    experts, info = {}, {}
    for kind in EXPERTS:
        path = checkpoints[kind]
        if path is None:
            raise ConfigError(f"model.{kind}_checkpoint is not set: phase 3 starts from two phase-2 experts")
        checkpoint = load_checkpoint_file(path)
        meta = read_phase_metadata(checkpoint, path)
        if meta["phase"] not in ("adapt", "group_prompt"):
            raise CheckpointError(f"model.{kind}_checkpoint={path}: a '{meta['phase']}' checkpoint is not an expert")
        if meta["expert"]["kind"] != kind:
            raise ConfigError(f"model.{kind}_checkpoint={path} holds a '{meta['expert']['kind']}' expert, "
                              f"expected '{kind}' (are the two checkpoints swapped?)")
        if meta["num_classes"] != num_classes:
            raise ConfigError(f"model.{kind}_checkpoint={path}: trained for {meta['num_classes']} classes, "
                              f"but the data has {num_classes}")
        experts[kind] = expert_from_checkpoint(checkpoint, path)
        info[kind] = {"expert": meta["expert"], "group_prompts": meta.get("group_prompts"),
                      "logit_scale": float(meta.get("logit_scale", 20.0)), "source": str(path),
                      "data": meta.get("data")}
        info[kind]["digest"] = expert_digest(experts[kind], architecture(info[kind]))
    return experts, info


def recorded_experts(meta: dict[str, Any], num_classes: int, where: str) -> dict[str, dict[str, Any]]:
    """The experts a phase-3 checkpoint's metadata records, checked."""
    info = meta.get("experts")
    if not isinstance(info, dict) or set(info) != set(EXPERTS):
        raise CheckpointError(f"{where}: records no specs of both experts (written by another phase or an "
                              "earlier version of lpt_lightning)")
    if meta.get("num_classes") != num_classes:
        raise ConfigError(f"{where}: trained for {meta.get('num_classes')} classes, but the data has {num_classes}")
    return info


def experts_from_specs(info: dict[str, dict[str, Any]], num_classes: int, where: str) -> dict[str, LongTailExpert]:
    return {kind: expert_from_specs(info[kind], num_classes, where) for kind in EXPERTS}
