"""Phase 1 (AdaptPhase): train the shared prompt, the adapters and the head; backbone frozen."""
from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from lpt_lightning.checkpoints.metadata import is_saved_key
from lpt_lightning.errors import ConfigError
from lpt_lightning.models.expert import ExpertSpec, LongTailExpert
from lpt_lightning.phases.base import ExpertPhase, LossSpec, OptimSpec


START_STATE_KEY = "lpt_start_state"


class AdaptPhase(ExpertPhase):
    """LPT++ phase 1 for one expert (SPEC 5); ``expert.adapters: false`` gives plain LPT phase 1.

    Args:
        expert: the expert's architecture and backbone weights.
        num_classes: linked from ``data.num_classes``.
        class_names: linked from ``data.class_names`` (the VL head starts from their text embeddings).
        loss: A-GCL settings (or logit-adjusted CE).
        optim: SGD and schedule settings.
        split_convention: many/medium/few thresholds, ``lpt`` (few <= 20) or ``oltr`` (few < 20).
        compile: compile the expert's forward with ``torch.compile`` (default inductor backend) on
            every rank; the first training step pays the compile time (printed). A run setting: not
            saved with the model.
    """

    phase_name = "adapt"

    def __init__(self, expert: ExpertSpec | None = None, num_classes: int = 0, class_names: list[str] | None = None,
                 loss: LossSpec | None = None, optim: OptimSpec | None = None,
                 split_convention: Literal["lpt", "oltr"] = "lpt", compile: bool = False):
        super().__init__(num_classes, class_names, loss or LossSpec(), optim or OptimSpec(), split_convention,
                         compile)
        expert = expert or ExpertSpec()
        self.save_init_arguments(expert=expert, num_classes=num_classes, class_names=self.class_names,
                                 loss=self.loss_spec, optim=self.optim_spec, split_convention=split_convention)
        self.expert = LongTailExpert(expert, num_classes)
        head_init = expert.head_init if expert.head_init != "auto" else ("text" if expert.kind == "vl" else "random")
        if head_init == "text":
            if not class_names:
                raise ConfigError("expert.head_init='text' (the vl expert's default) needs class names: "
                                  "set model.class_names or use a data source that provides them")
            if len(class_names) != num_classes:
                raise ConfigError(f"{len(class_names)} class names for {num_classes} classes")
            self.expert.init_head_from_text(class_names)
            rank_zero_info(f"head initialised from CLIP text embeddings of {num_classes} class names")
        self.head_init = head_init
        self.head_ready = head_init != "class_mean"  # class_mean: set by init_head_from_class_means or a restore
        # The trained tensors as they stood before the first step (the head after its text or
        # class-mean initialisation): the expert's no-training row. Saved with every checkpoint, so
        # a resumed run still reports where it started.
        self.start_state: dict[str, torch.Tensor] | None = None
        self.anchor_head: torch.Tensor | None = None  # loss.head_anchor's target, set at train start
        self.expert.release_text_tower()  # the text tower is only needed for the head's initialisation

    @property
    def wants_class_mean_head(self) -> bool:
        """True until the class-mean head is initialised (the ClassMeanHeadInit callback feeds it)."""
        return not self.head_ready

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.wants_class_mean_head:
            raise ConfigError("expert.head_init=class_mean: the head was not initialised; add "
                              "lpt_lightning.callbacks.ClassMeanHeadInit to the trainer's callbacks (lpt adds it)")

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.start_state is None:  # a resumed run restored it with its checkpoint
            self.start_state = {k: v.detach().cpu().clone() for k, v in self.state_dict().items() if is_saved_key(k)}
        self.set_anchor_head()

    def set_anchor_head(self) -> None:
        """loss.head_anchor's target, the start head's class directions: normalised once, on the
        training device (not copied from the host every step)."""
        if self.loss_spec.head_anchor:
            start = self.start_state["expert.head.weight"].to(self.expert.head.weight)
            self.anchor_head = F.normalize(start, dim=-1)

    def head_penalty(self) -> torch.Tensor | None:
        if self.anchor_head is None:
            return None
        drift = F.normalize(self.expert.head.weight, dim=-1) - self.anchor_head
        return self.loss_spec.head_anchor * drift.pow(2).sum(-1).mean()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.start_state is not None:
            checkpoint[START_STATE_KEY] = self.start_state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.head_ready = True  # the head comes from the checkpoint
        self.start_state = checkpoint.get(START_STATE_KEY, self.start_state)

    def load_start_state(self) -> None:
        """Put the trained tensors back to where phase 1 started (for its no-training row)."""
        if self.start_state is None:
            raise ConfigError("this phase-1 model has no starting state: it was not trained, or its checkpoint "
                              "predates start states")
        self.load_state_dict({k: v.to(self.device) for k, v in self.start_state.items()}, strict=False)

    @torch.no_grad()
    def init_head_from_class_means(self, batches: Iterable[dict[str, torch.Tensor]]) -> None:
        """Head = mean feature of each class over ``batches`` (this rank's shard of the training
        split, eval transform), summed over ranks when a trainer is attached."""
        sums = torch.zeros(self.num_classes, self.expert.backbone.feature_dim, device=self.device)
        counts = torch.zeros(self.num_classes, device=self.device)
        self.expert.eval()
        trainer = self._trainer
        autocast = trainer.precision_plugin.forward_context if trainer is not None else contextlib.nullcontext
        for batch in batches:
            labels = batch["label"].to(self.device)
            with autocast():
                features = self.expert(batch["image"].to(self.device)).features.float()
            sums.index_add_(0, labels, features)
            counts.index_add_(0, labels, torch.ones_like(labels, dtype=counts.dtype))
        self.expert.train(self.training)
        if trainer is not None:
            sums = trainer.strategy.reduce(sums, reduce_op="sum")
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        self.expert.head.init_from(sums / counts.clamp_min(1)[:, None])
        self.head_ready = True

    def metadata(self) -> dict[str, Any]:
        return super().metadata() | {"phase": self.phase_name, "expert": asdict(self.expert.spec),
                                     "group_prompts": None}
