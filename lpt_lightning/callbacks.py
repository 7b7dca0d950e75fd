"""Training-loop policies of every phase, as Lightning callbacks: per-batch seeding, what a
non-finite loss does, and the class-mean head initialisation that needs the DataModule's loader.

`lpt` adds them to every trainer (all subcommands and the pipeline) unless the config brings its
own of the same class in ``trainer.callbacks``; code that builds a ``Trainer`` itself passes
`default_callbacks()`.
"""
from __future__ import annotations

import os
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lpt_lightning.errors import ConfigError


def seed_training_step(epoch: int, batch_idx: int, rank: int) -> None:
    """Seed the global generators from (run seed, epoch, batch, rank) before each training batch.

    GCL noise and dropout then depend only on the batch, not on how many data-loader iterators
    or validation runs came before: a resumed run draws exactly what an uninterrupted one does.
    Seeding by batch rather than by optimiser step gives each micro-batch of a gradient
    accumulation window (and the batch after a skipped one) draws of its own.
    """
    base = int(os.environ.get("PL_GLOBAL_SEED", "0"))
    words = [base % 2**64, epoch, batch_idx, rank]  # SeedSequence takes no negative words
    torch.manual_seed(int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0]))


class StepSeeding(L.Callback):
    """`seed_training_step` before every training batch (exact resumption, mid-epoch too)."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        seed_training_step(trainer.current_epoch, batch_idx, trainer.global_rank)


class NonFiniteLossPolicy(L.Callback):
    """What a NaN/Inf training loss does.

    Args:
        on_nonfinite: ``stop`` training with a message naming the step and the batch's images (the
            last checkpoint is kept), or ``skip`` the batch: its gradients are dropped, so the
            optimiser step changes nothing; every rank skips when one does (DDP).
        max_nonfinite_batches: with ``skip``, stop once more than this many batches were skipped
            (the count is checkpointed).
    """

    def __init__(self, on_nonfinite: Literal["stop", "skip"] = "stop", max_nonfinite_batches: int = 10):
        if on_nonfinite not in ("stop", "skip"):
            raise ConfigError(f"NonFiniteLossPolicy: on_nonfinite must be stop or skip, got {on_nonfinite!r}")
        if max_nonfinite_batches < 0:
            raise ConfigError(f"NonFiniteLossPolicy: max_nonfinite_batches must be >= 0, got {max_nonfinite_batches}")
        self.on_nonfinite = on_nonfinite
        self.max_nonfinite_batches = max_nonfinite_batches
        self.skipped_batches = 0
        self._batch: Any = None
        self._batch_idx = 0
        self._kept_grads: list[tuple[torch.nn.Parameter, torch.Tensor | None]] | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._batch, self._batch_idx = batch, batch_idx  # for the message: the loss hook has no batch

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        bad = not bool(torch.isfinite(loss))
        skip = self.on_nonfinite == "skip"
        if skip and trainer.world_size > 1:  # every rank must skip the same step (DDP)
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return
        where = f"global step {trainer.global_step} (epoch {trainer.current_epoch}, batch {self._batch_idx})"
        if skip:
            self.skipped_batches += 1
            pl_module.log("train/skipped_batches", float(self.skipped_batches))
            if self.skipped_batches <= self.max_nonfinite_batches:
                rank_zero_warn(f"non-finite loss at {where}: batch skipped ({self.skipped_batches} so far)")
                # Keep the gradients from before this backward (earlier micro-batches of an
                # accumulation window); on_after_backward puts them back.
                self._kept_grads = [(p, None if p.grad is None else p.grad.clone())
                                    for p in pl_module.parameters() if p.requires_grad]
                return
        raise FloatingPointError(
            f"non-finite training loss ({float(loss)}) at {where}; images of the batch: "
            f"{batch_sources(trainer, self._batch)}. The last checkpoint is untouched; check these images, lower the "
            "learning rate, or add lpt_lightning.callbacks.NonFiniteLossPolicy with on_nonfinite=skip to "
            "trainer.callbacks to skip isolated bad batches")

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._kept_grads is not None:
            for parameter, grad in self._kept_grads:
                parameter.grad = grad
            self._kept_grads = None

    def state_dict(self) -> dict[str, int]:
        return {"skipped_batches": self.skipped_batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.skipped_batches = int(state_dict.get("skipped_batches", 0))


def batch_sources(trainer: L.Trainer, batch: Any, show: int = 8) -> str:
    """The first images of a training batch (dict of streams), by name where the data has names
    (`LongTailDataModule.training_items`; cached expert outputs have none)."""
    items = getattr(trainer.datamodule, "training_items", None)
    streams = batch.values() if isinstance(batch, dict) and "index" not in batch else [batch]
    indices = [int(i) for b in streams for i in b["index"]]
    names = [str(items[i]) if items is not None and isinstance(items[i], str) else f"train item {i}"
             for i in indices[:show]]
    more = f" and {len(indices) - show} more" if len(indices) > show else ""
    return ", ".join(names) + more


class ClassMeanHeadInit(L.Callback):
    """Feeds a module that asks for it (``wants_class_mean_head``, AdaptPhase with
    ``expert.head_init: class_mean``) the DataModule's eval-transform loader over the training split
    when a fit starts from scratch."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not getattr(pl_module, "wants_class_mean_head", False):  # False once restored from a checkpoint
            return
        if trainer.datamodule is None or not hasattr(trainer.datamodule, "split_dataloader"):
            raise ConfigError("expert.head_init=class_mean needs a LongTailDataModule (its training split's "
                              "class-mean features initialise the head)")
        pl_module.init_head_from_class_means(trainer.datamodule.split_dataloader("train"))
        rank_zero_info("head initialised from the class-mean training features")


def default_callbacks() -> list[L.Callback]:
    """The callbacks `lpt` adds to every trainer, for a ``Trainer`` built in Python."""
    return [NonFiniteLossPolicy(), ClassMeanHeadInit(), StepSeeding()]
