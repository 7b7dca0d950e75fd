"""Training phases: one LightningModule per LPT++ phase."""
from lpt_lightning.phases.adapt import AdaptPhase
from lpt_lightning.phases.base import ExpertPhase, LossSpec, OptimSpec
from lpt_lightning.phases.group_prompt import GroupPromptPhase
from lpt_lightning.phases.moe_scorer import MoEScorerPhase, ScorerSpec

__all__ = ["AdaptPhase", "ExpertPhase", "GroupPromptPhase", "LossSpec", "MoEScorerPhase", "OptimSpec", "ScorerSpec"]
