"""Phase 1 (AdaptPhase): train the shared prompt, the adapters and the head; backbone frozen."""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal

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
        elif head_init == "class_mean":
            raise ConfigError("expert.head_init='class_mean' is not available yet; use 'random' or 'text'")
        release = getattr(self.expert.backbone, "release_text_tower", None)
        if release is not None:
            release()  # the text tower is only needed for the head's initialisation

    def metadata(self) -> dict[str, Any]:
        return super().metadata() | {"phase": self.phase_name, "expert": asdict(self.expert.spec),
                                     "group_prompts": None}
