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

    ``stop`` never waits for the device inside a step: each loss is checked on the device, which
    keeps the first non-finite step, and the host reads that where Lightning reads its logs
    (every ``trainer.log_every_n_steps``), before any checkpoint is written, before validation
    and when training ends; the message names the first non-finite step, not the step it was
    read at. ``skip`` must decide before the optimiser step, so it reads the check every step.
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
        # stop: the steps since the last read (where, batch indices) and, on the device, the
        # window position of the first non-finite loss (-1: none) and that loss.
        self._window: list[tuple[str, Any]] = []
        self._first: torch.Tensor | None = None
        self._first_loss: torch.Tensor | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._batch, self._batch_idx = batch, batch_idx  # for the message: the loss hook has no batch

    def _where(self, trainer: L.Trainer) -> str:
        return f"global step {trainer.global_step} (epoch {trainer.current_epoch}, batch {self._batch_idx})"

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if self.on_nonfinite == "stop":
            self._record(trainer, loss.detach())
            return
        bad = not bool(torch.isfinite(loss))
        if trainer.world_size > 1:  # every rank must skip the same step (DDP)
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return
        self.skipped_batches += 1
        pl_module.log("train/skipped_batches", float(self.skipped_batches))
        if self.skipped_batches <= self.max_nonfinite_batches:
            rank_zero_warn(f"non-finite loss at {self._where(trainer)}: batch skipped ({self.skipped_batches} so far)")
            # Keep the gradients from before this backward (earlier micro-batches of an
            # accumulation window); on_after_backward puts them back.
            self._kept_grads = [(p, None if p.grad is None else p.grad.clone())
                                for p in pl_module.parameters() if p.requires_grad]
            return
        self._fail(trainer, f"{float(loss)}", self._where(trainer), self._batch)

    def _record(self, trainer: L.Trainer, loss: torch.Tensor) -> None:
        """Device-side: remember this step's place and, if it is the first non-finite one, the loss."""
        if self._first is None:
            self._first = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._first_loss = torch.zeros((), dtype=torch.float32, device=loss.device)
        self._window.append((self._where(trainer), _batch_indices(self._batch)))
        first_now = (self._first < 0) & ~torch.isfinite(loss)
        self._first = torch.where(first_now, len(self._window) - 1, self._first)
        self._first_loss = torch.where(first_now, loss.float(), self._first_loss)

    def check(self, trainer: L.Trainer) -> None:
        """Read the device-side check (a host sync): FloatingPointError if a loss since the last
        read was non-finite, on every rank when one saw it (DDP)."""
        if self._first is None or not self._window:
            return
        position = int(self._first)
        window = self._window
        self._window = []
        self._first.fill_(-1)
        bad = position >= 0
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return
        if position < 0:
            raise FloatingPointError("non-finite training loss on another rank: see its message; training stopped")
        where, indices = window[position]
        self._fail(trainer, f"{float(self._first_loss)}", where, indices)

    def _fail(self, trainer: L.Trainer, value: str, where: str, batch: Any) -> None:
        raise FloatingPointError(
            f"non-finite training loss ({value}) at {where}; images of the batch: "
            f"{batch_sources(trainer, batch)}. The last checkpoint is untouched; check these images, lower the "
            "learning rate, or add lpt_lightning.callbacks.NonFiniteLossPolicy with on_nonfinite=skip to "
            "trainer.callbacks to skip isolated bad batches")

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._kept_grads is not None:
            for parameter, grad in self._kept_grads:
                parameter.grad = grad
            self._kept_grads = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._batch = None  # no reference to the images past their step
        # Read when Lightning itself reads the logged values (one sync, not one per step).
        if trainer._logger_connector.should_update_logs:
            self.check(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.check(trainer)  # raising here leaves the file unwritten: the last checkpoint stays finite

    def state_dict(self) -> dict[str, int]:
        return {"skipped_batches": self.skipped_batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.skipped_batches = int(state_dict.get("skipped_batches", 0))


def _batch_indices(batch: Any) -> Any:
    """The ``index`` entries of a batch (dict of streams or one stream), without its images."""
    if batch is None:
        return None
    if isinstance(batch, dict) and "index" not in batch:
        return {stream: {"index": b["index"]} for stream, b in batch.items()}
    return {"index": batch["index"]}


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
        pl_module.init_head_from_class_means(trainer.datamodule.split_dataloader("train", views=False))
        rank_zero_info("head initialised from the class-mean training features")


def default_callbacks() -> list[L.Callback]:
    """The callbacks `lpt` adds to every trainer, for a ``Trainer`` built in Python."""
    return [NonFiniteLossPolicy(), ClassMeanHeadInit(), StepSeeding()]
