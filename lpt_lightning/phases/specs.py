"""The training settings of phases 1 and 2: the objective (`LossSpec`) and the optimiser and
its schedule (`OptimSpec`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lpt_lightning.errors import ConfigError


@dataclass
class LossSpec:
    """Training objective (SPEC 3, 4).

    Attributes:
        kind: ``agcl`` (reference), ``logit_adjusted`` cross-entropy (ablation) or plain ``ce``
            (cross-entropy on the scaled cosine logits: logit adjustment with tau 0).
        scale: cosine logit scale s.
        margin: GCL margin m on the target logit.
        beta: GCL perturbation weight.
        smoothing: label smoothing of A-GCL.
        class_balanced_gammas: (gamma_pos, gamma_neg) for the class-balanced batch.
        instance_gammas: (gamma_pos, gamma_neg) for the instance-balanced (and square-root) batch.
        instance_weight: eta_max in eta(e) = eta_max (E - e) / E, the instance batch's weight
            when it is paired with a class-balanced batch (over optimizer steps, e = step and
            E = the run's steps, in a run bounded by steps or one epoch; clamped to [0, eta_max]).
        match_weight: weight of the prompt-key matching loss (phase 2).
        tau: logit-adjustment strength (``logit_adjusted`` only).
        head_anchor: weight of a penalty that keeps the head's class directions near where phase 1
            started them (the class-name text embeddings of the VL expert; phase 1 only):
            head_anchor * mean_c ||w_c/|w_c| - w0_c/|w0_c|||^2. 0 = off.
    """

    kind: Literal["agcl", "logit_adjusted", "ce"] = "agcl"
    scale: float = 20.0
    margin: float = 0.1
    beta: float = 0.5
    smoothing: float = 0.1
    class_balanced_gammas: tuple[float, float] = (0.0, 4.0)
    instance_gammas: tuple[float, float] = (0.5, 8.0)
    instance_weight: float = 0.5
    match_weight: float = 0.5
    tau: float = 1.0
    head_anchor: float = 0.0

    def __post_init__(self) -> None:
        if self.head_anchor < 0:
            raise ConfigError(f"model.init_args.loss.head_anchor must be >= 0 (0 = off), got {self.head_anchor}")


@dataclass
class OptimSpec:
    """SGD with a per-epoch cosine schedule and linear warm-up (SPEC 4).

    ``base_lr`` is for a global batch of 256 images: lr = base_lr * B / 256 with B the per-stream
    batch summed over devices and accumulation steps. ``head_lr_scale`` multiplies the head's
    learning rate (0 keeps the head where it starts).

    A run bounded by ``trainer.max_epochs >= 2`` steps the schedule once per epoch (SPEC 4). A run
    bounded by ``trainer.max_steps`` (or by ``max_epochs: 1``) runs the same cosine over its real
    length in optimizer steps (``trainer.estimated_stepping_batches``), the warm-up converted to
    steps (``warmup_epochs`` x optimizer steps per epoch); a warm-up as long as the run is refused.
    """

    base_lr: float = 0.02
    head_lr_scale: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 0.01
    warmup_epochs: int = 1
    warmup_lr: float = 1e-6
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.head_lr_scale < 0:
            raise ConfigError(f"model.init_args.optim.head_lr_scale must be >= 0 (0 = a fixed head), "
                              f"got {self.head_lr_scale}")
