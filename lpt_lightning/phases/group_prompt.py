"""Phase 2 (GroupPromptPhase): load phase 1, freeze its prompt and adapters, train the group
prompt pool, its keys and the head with the full phase-2 objective (SPEC 4).

A phase-2 checkpoint stands alone: its tensors include the phase-1 prompt, adapters and head it
started from, and its hyperparameters the resolved expert spec without the phase-1 path, so
`lpt test` / `lpt predict` / ``GroupPromptPhase.load_from_checkpoint`` rebuild it without the
phase-1 file (which the metadata still names, for provenance).
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal

from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lpt_lightning.checkpoints.experts import expert_from_checkpoint, expert_spec_from_dict
from lpt_lightning.checkpoints.files import load_checkpoint_file
from lpt_lightning.checkpoints.metadata import META_KEY, check_phase_metadata, check_same_data, read_phase_metadata
from lpt_lightning.errors import ConfigError
from lpt_lightning.models.expert import ExpertSpec, GroupPromptSpec, LongTailExpert
from lpt_lightning.phases.base import ExpertPhase, LossSpec, OptimSpec

class GroupPromptPhase(ExpertPhase):
    """LPT++ phase 2 for one expert.

    Args:
        phase1_checkpoint: the AdaptPhase checkpoint to start from (read with weights_only=True).
            None: the phase is rebuilt from ``expert`` alone and every trained tensor must come
            from a phase-2 checkpoint (what ``load_from_checkpoint`` and ``--ckpt_path`` do).
        expert: optional with a phase-1 checkpoint: None = take it from the checkpoint; when
            given it must match the checkpoint's expert (a guard against pointing a config at
            the wrong run).
        group_prompts: pool size, top-k, start block K and prompt length.
        num_classes, class_names, loss, optim, split_convention, compile: as in AdaptPhase.
    """

    phase_name = "group_prompt"

    def __init__(self, phase1_checkpoint: str | None = None, expert: ExpertSpec | None = None,
                 group_prompts: GroupPromptSpec | None = None, num_classes: int = 0,
                 class_names: list[str] | None = None, loss: LossSpec | None = None, optim: OptimSpec | None = None,
                 split_convention: Literal["lpt", "oltr"] = "lpt", compile: bool = False):
        super().__init__(num_classes, class_names, loss or LossSpec(), optim or OptimSpec(), split_convention,
                         compile)
        self.phase1_checkpoint = phase1_checkpoint
        self.phase1_source = phase1_checkpoint  # provenance in the metadata, kept across a rebuild
        self.phase1_data: dict[str, Any] | None = None
        if phase1_checkpoint is not None:
            self.expert = self._expert_from_phase1(phase1_checkpoint, expert)
            rank_zero_info(f"phase 2 starts from {phase1_checkpoint}")
        elif expert is not None:
            self.expert = LongTailExpert(expert, num_classes)
            self.expert.release_text_tower()  # the head comes from the phase-2 checkpoint
        else:
            raise ConfigError("GroupPromptPhase needs model.phase1_checkpoint (or, to restore a phase-2 checkpoint, "
                              "model.expert)")
        self.awaits_restore = phase1_checkpoint is None  # until on_load_checkpoint fills the trained tensors
        self.group_spec = group_prompts or GroupPromptSpec()
        self.expert.add_group_prompts(self.group_spec)
        for module in self.frozen_modules():
            for p in module.parameters():
                p.requires_grad_(False)
        # Everything a rebuild needs, phase 1 included in the spec and the tensors: no phase-1 path.
        self.save_init_arguments(phase1_checkpoint=None, expert=self.expert.spec, group_prompts=self.group_spec,
                                 num_classes=num_classes, class_names=self.class_names, loss=self.loss_spec,
                                 optim=self.optim_spec, split_convention=split_convention)

    def _expert_from_phase1(self, path: str, expert: ExpertSpec | None) -> LongTailExpert:
        checkpoint = load_checkpoint_file(path)
        meta = read_phase_metadata(checkpoint, path)
        check_phase_metadata(meta, path, "model.phase1_checkpoint", "adapt", self.num_classes)
        saved_spec = expert_spec_from_dict(meta["expert"], path)
        if expert is not None and asdict(expert) != asdict(saved_spec):
            diff = [k for k, v in asdict(expert).items() if asdict(saved_spec)[k] != v]
            raise ConfigError(f"model.expert differs from the expert of {path} in {diff} "
                              f"(checkpoint: { {k: asdict(saved_spec)[k] for k in diff} }); "
                              "drop model.expert to take it from the checkpoint")
        self.phase1_data = meta.get("data")
        # Head, shared prompt and adapters come from phase 1 (no text-tower init needed here).
        return expert_from_checkpoint(checkpoint, path)

    def _check_restored(self) -> None:
        if self.awaits_restore:
            raise ConfigError("GroupPromptPhase built without model.phase1_checkpoint has no trained tensors: "
                              "give a phase-2 checkpoint (ckpt_path) or model.phase1_checkpoint to start from")

    # A restore comes after setup and before these hooks.
    on_validation_start = on_test_start = on_predict_start = _check_restored

    def on_fit_start(self) -> None:
        self._check_restored()
        super().on_fit_start()

    def check_upstream_data(self) -> None:
        if self.phase1_checkpoint is None:
            return  # restored from a phase-2 checkpoint: its phase 1 was checked when that run started
        check_same_data(self.phase1_data, self.data_record, f"model.phase1_checkpoint={self.phase1_checkpoint}")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.awaits_restore = False  # every tensor, phase 1's included, comes from this checkpoint
        self.phase1_source = (checkpoint.get(META_KEY) or {}).get("phase1_checkpoint", self.phase1_source)

    def frozen_modules(self) -> list[nn.Module]:
        return [m for m in (self.expert.backbone, self.expert.shared_prompt, self.expert.adapters) if m is not None]

    def metadata(self) -> dict[str, Any]:
        return super().metadata() | {"phase": self.phase_name, "expert": asdict(self.expert.spec),
                                     "group_prompts": asdict(self.group_spec),
                                     "phase1_checkpoint": self.phase1_source}
