"""What a person reads in a log: plain progress lines when the output is a file (every SLURM
log), and no messages that ask nothing of the user."""
from __future__ import annotations

import logging
import math
import os
import sys
import time
import warnings
from datetime import timedelta
from typing import Any

import torch
from lightning.pytorch.callbacks import ProgressBar


class LogLines(ProgressBar):
    """Training progress as plain lines instead of a redrawn bar, whose every frame stays in a
    redirected log: one line every ``every_n_steps`` batches (default: the trainer's
    ``log_every_n_steps``) with loss, learning rate, images/s and the phase's ETA, and one line per
    epoch with the validation split accuracy. Only the first rank prints."""

    def __init__(self, every_n_steps: int | None = None):
        super().__init__()
        self.every_n_steps = every_n_steps
        self.enabled = True

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start = time.monotonic()
        self._images = self._batches = 0

    on_train_start = on_train_epoch_start  # a run resumed mid-epoch starts without the epoch hook

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._images += _count_images(batch) * trainer.world_size
        self._batches += 1
        every = self.every_n_steps or trainer.log_every_n_steps or 50
        if self.enabled and (batch_idx + 1) % every == 0:
            total = self.total_train_batches
            seconds = time.monotonic() - self._epoch_start
            per_batch = seconds / self._batches
            remaining = (total - batch_idx - 1) if math.isfinite(total) else 0
            if trainer.max_epochs and trainer.max_epochs > 0 and math.isfinite(total):
                remaining += (trainer.max_epochs - trainer.current_epoch - 1) * total
            loss = trainer.callback_metrics.get("train/loss")  # a device tensor: read only at these lines
            lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None
            parts = [_epoch(trainer), f"batch {batch_idx + 1}/{total if math.isfinite(total) else '?'}"]
            parts += [f"loss {float(loss):.4f}"] if loss is not None else []
            parts += [f"lr {lr:.3g}"] if lr is not None else []
            parts += [f"{self._images / max(seconds, 1e-9):,.0f} img/s", f"ETA {_clock(remaining * per_batch)}"]
            self.print("  ".join(parts))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self.enabled:
            return
        seconds = time.monotonic() - self._epoch_start
        metrics = trainer.callback_metrics
        parts = [f"{_epoch(trainer)} done in {_clock(seconds)}"]
        if "train/loss" in metrics:
            parts.append(f"loss {float(metrics['train/loss']):.4f}")
        val = [f"{key.split('_')[-1] if '_' in key else 'overall'} {float(metrics[key]):.2f}"
               for key in ("val/acc", "val/acc_many", "val/acc_medium", "val/acc_few") if key in metrics]
        if val:
            parts.append("val acc (%) " + ", ".join(val))
        self.print("  ".join(parts))

    def print(self, *args: Any, **kwargs: Any) -> None:
        print(*args, **kwargs, flush=True)


def _epoch(trainer) -> str:
    limit = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
    return f"epoch {trainer.current_epoch + 1}{limit}"


def _count_images(batch: Any) -> int:
    """Images in a batch: the labels of every stream (dual sampling nests one dict per stream)."""
    if isinstance(batch, dict):
        if isinstance(batch.get("label"), torch.Tensor):
            return len(batch["label"])
        return sum(_count_images(v) for v in batch.values())
    return 0


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


def plain_output() -> bool:
    """True when the progress goes to a file or pipe, not a terminal."""
    return not sys.stdout.isatty()


class _DropMessages(logging.Filter):
    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def silence_noise() -> None:
    """Drop messages that ask nothing of a user of this app; keep every warning that does."""
    # Lightning's advertisements for its cloud products (printed by every Trainer).
    logging.getLogger("lightning.fabric.utilities.rank_zero").addFilter(_DropMessages("💡 Tip:"))
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropMessages("💡 Tip:"))
    logging.getLogger("lightning.pytorch.trainer.connectors.checkpoint_connector").addFilter(
        _DropMessages("`weights_only` was not set"))
    # The split metrics are torchmetrics whose states are summed over ranks before they are logged.
    warnings.filterwarnings("ignore", message=r".*when logging on epoch level in distributed setting.*")
    # A deprecation inside Lightning's own code, raised on every fit.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # W&B's history sparklines and viewer hints; its warnings, errors and the run's location stay.
    os.environ.setdefault("WANDB_QUIET", "true")
