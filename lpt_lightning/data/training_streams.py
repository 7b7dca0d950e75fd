"""The training loader over the sampling's streams, and the one object that owns its resume state."""
from __future__ import annotations

import warnings
from typing import Any, Literal, Sequence

import numpy as np
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from lpt_lightning.data.samplers import ClassAwareSampler, InstanceSampler, PowerSampler, StreamBatchSampler
from lpt_lightning.errors import ConfigError

Sampling = Literal["dual", "instance", "class_aware", "square_root"]
STREAMS = {"dual": ("cb", "ib"), "instance": ("ib",), "class_aware": ("cb",), "square_root": ("sqrt",)}
# Added to the seed of the instance stream: keeps its draws (and their augmentations) apart from the
# class-aware stream's, which uses the seed itself.
INSTANCE_SEED_OFFSET = 1_000_003


class TrainingDataLoader(StatefulDataLoader):
    """torchdata's stateful loader, with a clear error for a state it cannot restore.

    Lightning saves ``state_dict()`` in every checkpoint and restores it when it resumes mid-epoch:
    the state of the `StreamBatchSampler` at the last batch handed out, so the epoch continues
    with the next one whatever the loader prefetched. torchdata ties a mid-epoch state to the
    worker count it was taken with.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, deprecated in torch 2.14
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            super().__init__(*args, **kwargs)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        snapshot = state_dict.get("_snapshot")  # only states of multi-process iterators have one
        saved = snapshot["_main_snapshot"]["_num_workers"] if snapshot else 0
        if state_dict and saved != self.num_workers:
            raise ConfigError(
                f"the checkpoint stopped mid-epoch with data.num_workers={saved}; resume with that worker count "
                f"(this run has {self.num_workers}), or from a checkpoint written at the end of an epoch")
        super().load_state_dict(state_dict)


class TrainingStreams:
    """Builds the training streams of one sampling and their loader, and owns the resume state of
    training data: the epoch under way and the steps handed out (held by the `StreamBatchSampler`
    it built last).

    Args:
        sampling: "dual" (cb + ib), "instance", "class_aware" or "square_root".
        batch_size: per-device batch size of each stream.
        images_per_class: consecutive images per class visit of the class-aware stream.
        seed: seed of the samplers (the epoch is added each epoch).
        draw_keys: the samplers yield `Draw` keys (an augmentation seed per draw), for image data.

    A checkpoint restores it along two paths. Mid-epoch, Lightning restores the loader's own state
    (``TrainingDataLoader.load_state_dict``, torchdata asking the sampler): the exact step. From a
    checkpoint written at the end of an epoch, Lightning resumes with the next epoch but creates the
    loader's first iterator, whose workers prefetch, before it calls ``set_epoch``; the sampler then
    starts from this object's record (``state_dict`` / ``load_state_dict``, saved by the DataModule):
    the epoch after the saved one. A mid-epoch restore of the loader overrides the record.
    """

    def __init__(self, sampling: Sampling, batch_size: int, images_per_class: int, seed: int,
                 draw_keys: bool) -> None:
        if sampling not in STREAMS:
            raise ConfigError(f"data.sampling must be one of {', '.join(STREAMS)}; got {sampling!r}")
        self.sampling = sampling
        self.batch_size = batch_size
        self.images_per_class = images_per_class
        self.seed = seed
        self.draw_keys = draw_keys
        self._sampler: StreamBatchSampler | None = None  # the one the current loader iterates
        self._resume_after_epoch: int | None = None  # from a checkpoint: the epoch under way when it was written

    def sampler(self, kind: str, labels: Sequence[int] | np.ndarray, num_replicas: int = 1,
                rank: int = 0) -> ClassAwareSampler | InstanceSampler | PowerSampler:
        """A fresh sampler of one stream: "cb" class-aware, "ib" instance, "sqrt" square-root."""
        common = dict(num_replicas=num_replicas, rank=rank, draw_keys=self.draw_keys)
        if kind == "cb":
            return ClassAwareSampler(labels, images_per_class=self.images_per_class, seed=self.seed, **common)
        if kind == "ib":
            return InstanceSampler(labels, seed=self.seed + INSTANCE_SEED_OFFSET, **common)
        if kind == "sqrt":
            return PowerSampler(labels, power=0.5, seed=self.seed, **common)
        raise ConfigError(f"unknown sampler kind {kind!r}")

    def loader(self, dataset: Dataset, labels: Sequence[int] | np.ndarray, num_replicas: int, rank: int,
               what: str, **options: Any) -> TrainingDataLoader:
        """One loader for every stream: ``dataset`` takes a `StreamBatchSampler` step (`StreamBatches`).
        ``what`` names the samples in the error for a batch larger than a device's share."""
        streams = {kind: self.sampler(kind, labels, num_replicas, rank) for kind in STREAMS[self.sampling]}
        per_device = min(len(sampler) for sampler in streams.values())
        if per_device < self.batch_size:
            raise ConfigError(f"data.batch_size={self.batch_size} exceeds the {per_device} {what} per device "
                              "(drop_last would leave no batch); lower data.batch_size")
        sampler = StreamBatchSampler(streams, self.batch_size)
        if self._resume_after_epoch is not None:
            sampler.load_state_dict({"epoch": self._resume_after_epoch, "steps_done": len(sampler)})
            self._resume_after_epoch = None
        self._sampler = sampler
        return TrainingDataLoader(dataset, sampler=sampler, batch_size=None, **options)

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: the training epoch under way."""
        return {"train_epoch": self._sampler.epoch} if self._sampler is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_after_epoch = state_dict.get("train_epoch")


def trainer_replicas(trainer) -> tuple[int, int]:
    """(world size, global rank) of a DataModule's trainer; (1, 0) before one is attached."""
    if trainer is None:
        return 1, 0
    return int(getattr(trainer, "world_size", 1)), int(getattr(trainer, "global_rank", 0))
