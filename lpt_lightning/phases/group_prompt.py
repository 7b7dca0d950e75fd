"""Phase 2 (GroupPromptPhase): load phase 1, freeze its prompt and adapters, train the group
prompt pool, its keys and the head with the full phase-2 objective (SPEC 4)."""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal

from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lpt_lightning.checkpoints import (
    check_same_data,
    expert_from_checkpoint,
    expert_spec_from_dict,
    load_checkpoint_file,
    read_phase_metadata,
)
from lpt_lightning.errors import CheckpointError, ConfigError
from lpt_lightning.models.expert import ExpertSpec, GroupPromptSpec
from lpt_lightning.phases.base import ExpertPhase, LossSpec, OptimSpec


class GroupPromptPhase(ExpertPhase):
    """LPT++ phase 2 for one expert.

    Args:
        phase1_checkpoint: the AdaptPhase checkpoint to start from (read with weights_only=True).
        expert: optional; when given it must match the checkpoint's expert (a guard against
            pointing a config at the wrong run). None = take it from the checkpoint.
        group_prompts: pool size, top-k, start block K and prompt length.
        num_classes, class_names, loss, optim, split_convention: as in AdaptPhase.
    """

    phase_name = "group_prompt"

    def __init__(self, phase1_checkpoint: str, expert: ExpertSpec | None = None,
                 group_prompts: GroupPromptSpec | None = None, num_classes: int = 0,
                 class_names: list[str] | None = None, loss: LossSpec | None = None, optim: OptimSpec | None = None,
                 split_convention: Literal["lpt", "oltr"] = "lpt"):
        super().__init__(num_classes, class_names, loss or LossSpec(), optim or OptimSpec(), split_convention)
        self.phase1_checkpoint = phase1_checkpoint
        checkpoint = load_checkpoint_file(phase1_checkpoint)
        meta = read_phase_metadata(checkpoint, phase1_checkpoint)
        if meta["phase"] != "adapt":
            raise CheckpointError(f"model.phase1_checkpoint={phase1_checkpoint}: written by phase "
                                  f"'{meta['phase']}', expected an 'adapt' (phase 1) checkpoint")
        if meta["num_classes"] != num_classes:
            raise ConfigError(f"model.phase1_checkpoint={phase1_checkpoint}: trained for {meta['num_classes']} "
                              f"classes, but the data has {num_classes}")
        saved_spec = expert_spec_from_dict(meta["expert"], phase1_checkpoint)
        if expert is not None and asdict(expert) != asdict(saved_spec):
            diff = [k for k, v in asdict(expert).items() if asdict(saved_spec)[k] != v]
            raise ConfigError(f"model.expert differs from the expert of {phase1_checkpoint} in {diff} "
                              f"(checkpoint: { {k: asdict(saved_spec)[k] for k in diff} }); "
                              "drop model.expert to take it from the checkpoint")
        # Head, shared prompt and adapters come from phase 1 (no text-tower init needed here).
        self.expert = expert_from_checkpoint(checkpoint, phase1_checkpoint)
        self.phase1_data = meta.get("data")
        self.group_spec = group_prompts or GroupPromptSpec()
        self.expert.add_group_prompts(self.group_spec)
        for module in self.frozen_modules():
            for p in module.parameters():
                p.requires_grad_(False)
        rank_zero_info(f"phase 2 starts from {phase1_checkpoint}")

    def check_upstream_data(self) -> None:
        check_same_data(self.phase1_data, self.data_record, f"model.phase1_checkpoint={self.phase1_checkpoint}")

    def frozen_modules(self) -> list[nn.Module]:
        return [m for m in (self.expert.backbone, self.expert.shared_prompt, self.expert.adapters) if m is not None]

    def metadata(self) -> dict[str, Any]:
        return super().metadata() | {"phase": self.phase_name, "expert": asdict(self.expert.spec),
                                     "group_prompts": asdict(self.group_spec),
                                     "phase1_checkpoint": self.phase1_checkpoint}
