"""Phase 1 (AdaptPhase): train the shared prompt, the adapters and the head; backbone frozen."""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info

from lpt_lightning.errors import ConfigError
from lpt_lightning.models.expert import ExpertSpec, LongTailExpert
from lpt_lightning.phases.base import ExpertPhase, LossSpec, OptimSpec


class AdaptPhase(ExpertPhase):
    """LPT++ phase 1 for one expert (SPEC 5); ``expert.adapters: false`` gives plain LPT phase 1.

    Args:
        expert: the expert's architecture and backbone weights.
        num_classes: linked from ``data.num_classes``.
        class_names: linked from ``data.class_names`` (the VL head starts from their text embeddings).
        loss: A-GCL settings (or logit-adjusted CE).
        optim: SGD and schedule settings.
        split_convention: many/medium/few thresholds, ``lpt`` (few <= 20) or ``oltr`` (few < 20).
    """

    phase_name = "adapt"

    def __init__(self, expert: ExpertSpec | None = None, num_classes: int = 0, class_names: list[str] | None = None,
                 loss: LossSpec | None = None, optim: OptimSpec | None = None,
                 split_convention: Literal["lpt", "oltr"] = "lpt"):
        super().__init__(num_classes, class_names, loss or LossSpec(), optim or OptimSpec(), split_convention)
        expert = expert or ExpertSpec()
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
        release = getattr(self.expert.backbone, "release_text_tower", None)
        if release is not None:
            release()  # the text tower is only needed for the head's initialisation

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.head_init == "class_mean" and self.global_step == 0:  # not again on resume
            self.init_head_from_class_means()

    @torch.no_grad()
    def init_head_from_class_means(self) -> None:
        """Head = mean training feature of each class (one eval pass over the training split,
        summed over ranks)."""
        loader = self.trainer.datamodule.split_dataloader("train")
        sums = torch.zeros(self.num_classes, self.expert.backbone.feature_dim, device=self.device)
        counts = torch.zeros(self.num_classes, device=self.device)
        self.expert.eval()
        for batch in loader:
            labels = batch["label"].to(self.device)
            with self.trainer.precision_plugin.forward_context():
                features = self.expert(batch["image"].to(self.device)).features.float()
            sums.index_add_(0, labels, features)
            counts.index_add_(0, labels, torch.ones_like(labels, dtype=counts.dtype))
        self.expert.train(self.training)
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        self.expert.head.init_from(sums / counts.clamp_min(1)[:, None])
        rank_zero_info("head initialised from the class-mean training features")

    def metadata(self) -> dict[str, Any]:
        return super().metadata() | {"phase": self.phase_name, "expert": asdict(self.expert.spec),
                                     "group_prompts": None}
