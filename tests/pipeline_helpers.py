"""Callbacks the pipeline tests put into a phase's trainer config."""
import lightning as L


class CrashAt(L.Callback):
    """Stands in for a killed job: fails at a given epoch and batch, after earlier epochs saved."""

    def __init__(self, epoch: int = 1, batch: int = 1):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise RuntimeError("simulated node failure")


class SlurmPreemption(L.Callback):
    """What SLURM does near the time limit: SIGUSR1 (Lightning checkpoints and requeues), then a
    kill a few batches later, before the epoch ends."""

    def __init__(self, epoch: int = 1, signal_batch: int = 1, kill_batch: int = 3):
        self.epoch, self.signal_batch, self.kill_batch = epoch, signal_batch, kill_batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import os
        import signal

        if trainer.current_epoch != self.epoch:
            return
        if batch_idx == self.signal_batch:
            os.kill(os.getpid(), signal.SIGUSR1)
        if batch_idx == self.kill_batch:
            raise RuntimeError("killed at the time limit")


class DieOnRank(L.Callback):
    """One DDP rank dies abruptly (no Python clean-up), as after an OOM kill or a node failure."""

    def __init__(self, rank: int = 1, step: int = 3):
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        import os

        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            os._exit(9)


class SlurmTimeLimit(L.Callback):
    """SLURM's signal before the time limit (``--signal=SIGUSR1@...``) at a given epoch and batch,
    in a job's first run only: the requeued run (SLURM_RESTART_COUNT set) goes on to the end."""

    def __init__(self, epoch: int = 1, batch: int = 1):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import os
        import signal

        first_run = not int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        if first_run and trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGUSR1)
