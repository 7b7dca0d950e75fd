"""Callbacks the pipeline tests put into a phase's trainer config."""
import lightning as L


class CrashAt(L.Callback):
    """Stands in for a killed job: fails at a given epoch and batch, after earlier epochs saved."""

    def __init__(self, epoch: int = 1, batch: int = 1):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise RuntimeError("simulated node failure")
