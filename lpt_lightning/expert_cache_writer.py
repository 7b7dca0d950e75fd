"""Writing the expert-output cache: each rank's rows of each split into memory-mapped ``.npy``
shards, renamed into place when complete, then rank 0's manifest, every rank agreeing at each step.

The ranks agree after each step of the writing (a collective, which is also the barrier), so an
error on one rank stops every rank at once instead of leaving the others waiting until the
process group's timeout. Multi-node: every rank writes its own shard and rank 0 writes the
manifest after checking all shards are visible, so the cache directory must be on a filesystem
shared by all nodes; a rank that cannot see the others' files stops with a message saying so.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from lpt_lightning.checkpoints.files import atomic_save
from lpt_lightning.data.cached_outputs import MANIFEST, OUTPUTS_FORMAT, shard_file
from lpt_lightning.errors import CacheError


@dataclass
class OutputsTarget:
    """Where one predict loader's rows go, and what the manifest records about them."""

    name: str  # the split
    directory: Path
    num_rows: int
    manifest: dict[str, Any]


def agree(trainer, error: Exception | None, step: str) -> None:
    """Every rank learns whether every rank finished ``step``: the rank that failed raises its
    error, the others a CacheError, all at once. The vote is a collective, so it is also the
    barrier of ``step``."""
    if trainer.strategy.reduce_boolean_decision(error is None, all=True):
        return
    if error is not None:
        raise error
    raise CacheError(f"expert-output pass: another rank failed {step} (its error is in its log); rank "
                          f"{trainer.global_rank} stops too")


class ExpertCacheWriter(BasePredictionWriter):
    """Writes each rank's rows of each predict loader into memory-mapped ``.npy`` shards (floating
    arrays in ``dtype``), renames them into place when the pass is complete, and has rank 0 write
    the manifest once every rank's shards are there.

    A write that fails is kept until the end of the pass (later batches are not written), where
    every rank votes on success before any rank waits for the others."""

    def __init__(self, targets: list[OutputsTarget], dtype: str = "float16"):
        super().__init__(write_interval="batch")
        self.targets = targets
        self.dtype = dtype
        self._open: dict[tuple[int, str], tuple[np.memmap, Path]] = {}
        self._error: Exception | None = None

    def _temporary(self, target: OutputsTarget, rank: int, world: int, name: str) -> Path:
        final = shard_file(target.directory, rank, world, name)
        return final.with_name(f".{final.name}.tmp-{os.getpid()}")

    def _array(self, dataloader_idx: int, name: str, value: torch.Tensor, rank: int, world: int) -> np.memmap:
        key = (dataloader_idx, name)
        if key not in self._open:
            target = self.targets[dataloader_idx]
            rows = len(range(rank, target.num_rows, world))
            dtype = self.dtype if value.is_floating_point() and name.endswith((".logits", ".query")) else (
                "float32" if value.is_floating_point() else "int64")
            tmp = self._temporary(target, rank, world, name)
            tmp.parent.mkdir(parents=True, exist_ok=True)
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(rows, *value.shape[1:]))
            if name == "index":
                array[:] = -1  # rows never written stay -1: checked before the shard is accepted
            self._open[key] = (array, tmp)
        return self._open[key][0]

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        if self._error is not None:
            return
        rank, world = trainer.global_rank, trainer.world_size
        index = prediction["index"].cpu().numpy()
        position = (index - rank) // world  # the ShardedEvalSampler shard is range(rank, N, world)
        try:
            for name, value in prediction.items():
                self._array(dataloader_idx, name, value, rank, world)[position] = value.cpu().numpy()
        except Exception as exc:  # raised after the vote at the end of the pass (the other ranks vote too)
            self._error = exc

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        error, self._error = self._error, None
        if error is None:
            try:
                self._finish_shards(trainer)
            except Exception as exc:
                error = exc
        self._open.clear()
        agree(trainer, error, "writing its expert outputs")
        if trainer.is_global_zero:
            try:
                for target in self.targets:
                    self._write_manifest(target, trainer.world_size)
            except Exception as exc:
                error = exc
        agree(trainer, error, "writing the manifest")
        for target in self.targets:
            if not (target.directory / MANIFEST).is_file():
                error = CacheError(
                    f"{target.directory / MANIFEST}: rank {trainer.global_rank} cannot see the manifest rank 0 wrote. "
                    "On several nodes the expert-output cache must be on a filesystem every node sees: put the run "
                    "directory (or model.init_args.cache_dir) on shared storage")
        agree(trainer, error, "reading the manifest")  # no rank goes on to fit while another stops

    def _finish_shards(self, trainer) -> None:
        """This rank's shards checked, renamed into place and recorded."""
        rank, world = trainer.global_rank, trainer.world_size
        for i, target in enumerate(self.targets):
            opened = {name: entry for (idx, name), entry in self._open.items() if idx == i}
            rows = len(range(rank, target.num_rows, world))
            if rows and "index" not in opened:
                raise CacheError(f"{target.directory}: rank {rank} computed no outputs for the {target.name} split")
            if opened:
                missing = int((opened["index"][0] < 0).sum())
                if missing:
                    raise CacheError(
                        f"{target.directory}: {missing} images of the {target.name} split gave no output (unreadable "
                        "with data.skip_unreadable=true?); the scorer needs every image of the split")
            for name, (array, tmp) in opened.items():
                array.flush()
                del array
                os.replace(tmp, shard_file(target.directory, rank, world, name))
            shapes = {name: {"dtype": str(array.dtype), "shape": list(array.shape[1:])}
                      for name, (array, _) in opened.items()}
            record = json.dumps({"rows": rows, "arrays": shapes})
            atomic_save(lambda tmp, text=record: tmp.write_text(text), target.directory / f"rank{rank}-of-{world}.json")

    @staticmethod
    def _write_manifest(target: OutputsTarget, world: int) -> None:
        arrays: dict[str, Any] = {}
        for r in range(world):
            path = target.directory / f"rank{r}-of-{world}.json"
            if not path.is_file():
                raise CacheError(
                    f"{path}: missing, so rank 0 cannot see rank {r}'s expert outputs. On several nodes the cache "
                    "must be on a filesystem every node sees: put the run directory (or model.init_args.cache_dir) "
                    "on shared storage")
            arrays |= json.loads(path.read_text())["arrays"]
        manifest = dict(target.manifest, format=OUTPUTS_FORMAT, num_rows=target.num_rows, world_size=world,
                        arrays=arrays)
        atomic_save(lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)), target.directory / MANIFEST)
