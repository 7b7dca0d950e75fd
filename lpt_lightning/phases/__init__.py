"""Training phases: one LightningModule per LPT++ phase."""
from lpt_lightning.phases.adapt import AdaptPhase
from lpt_lightning.phases.base import ExpertPhase, LossSpec, OptimSpec
from lpt_lightning.phases.group_prompt import GroupPromptPhase

__all__ = ["AdaptPhase", "ExpertPhase", "GroupPromptPhase", "LossSpec", "OptimSpec"]
