"""LightningDataModule for long-tailed classification with dual (class + instance) sampling."""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from lpt_lightning.checkpoints.files import atomic_save
from lpt_lightning.data.long_tail import holdout_upto
from lpt_lightning.data.datasets import (
    LongTailImageDataset,
    StreamBatches,
    VerifyMode,
    collate_images,
    collate_skipping,
    decode_on_device,
    verify_images,
)
from lpt_lightning.data.samplers import (
    ClassAwareSampler,
    InstanceSampler,
    PowerSampler,
    ShardedEvalSampler,
    StreamBatchSampler,
)
from lpt_lightning.data.sources import IMAGE_EXTENSIONS, DatasetSplits, DataSource, Split, read_lines as _read_lines
from lpt_lightning.data.transforms import TestTimeSpec, build_eval_transform, build_train_transform
from lpt_lightning.errors import ConfigError, DataFormatError

Sampling = Literal["dual", "instance", "class_aware", "square_root"]
STREAMS = {"dual": ("cb", "ib"), "instance": ("ib",), "class_aware": ("cb",), "square_root": ("sqrt",)}


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


class StreamTrainingData:
    """What a DataModule needs for training with `StreamBatchSampler`: one `TrainingDataLoader` for
    all streams, and the epoch record that makes a resume from an epoch's end exact.

    Lightning restores the training loader's own state (the exact step) only when it resumes
    mid-epoch. From a checkpoint written at the end of an epoch it resumes with the next one but
    creates the loader's first iterator, whose workers prefetch, before it calls ``set_epoch``; the
    sampler then starts from the DataModule's record instead: the epoch after the saved one. (A
    mid-epoch restore of the loader overrides it.)
    """

    _train_sampler: StreamBatchSampler | None = None
    _resume_after_epoch: int | None = None  # from a checkpoint: the epoch under way when it was written

    def stream_loader(self, dataset: Dataset, streams: dict[str, Sampler], batch_size: int, what: str,
                      **options: Any) -> TrainingDataLoader:
        per_device = min(len(sampler) for sampler in streams.values())
        if per_device < batch_size:
            raise ConfigError(f"data.batch_size={batch_size} exceeds the {per_device} {what} per device "
                              "(drop_last would leave no batch); lower data.batch_size")
        sampler = StreamBatchSampler(streams, batch_size)
        if self._resume_after_epoch is not None:
            sampler.load_state_dict({"epoch": self._resume_after_epoch, "steps_done": len(sampler)})
            self._resume_after_epoch = None
        self._train_sampler = sampler
        return TrainingDataLoader(dataset, sampler=sampler, batch_size=None, **options)

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: the training epoch under way."""
        return {"train_epoch": self._train_sampler.epoch} if self._train_sampler is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_after_epoch = state_dict.get("train_epoch")


class LongTailDataModule(StreamTrainingData, LightningDataModule):
    """Data for LPT / LPT++ training and evaluation.

    Args:
        source: where the data comes from (any `DataSource`: annotation lists, iNat json,
            image folder, Fashion-MNIST).
        batch_size: training batch size per device; with ``sampling="dual"`` each of the two
            streams (class-balanced "cb" and instance-balanced "ib") has this size.
        eval_batch_size: per-device batch size of val/test/predict (default: batch_size).
        sampling: "dual" (cb + ib), "instance", "class_aware" or "square_root".
        images_per_class: consecutive images drawn per class visit by the class-aware sampler.
        num_workers: DataLoader worker processes per device. Training has one loader for every
            stream (one worker builds a whole step: the batches of all streams).
        img_size: crop size; None = the model's, set by `lpt` (`lpt_lightning.data_facts.connect`).
        seed: seed of the samplers (the epoch is added each epoch) and of training augmentation.
        skip_unreadable: drop undecodable images from batches instead of failing.
        verify_images: check every listed image before training, in ``max(num_workers, 1)``
            processes: "header" (default: the file exists, its header parses and a JPEG or PNG
            ends with its end marker: finds files cut off), "full" (every pixel decodes: also
            finds damage inside the data, several times slower) or "off". Under DDP each rank
            checks its share of the images and all ranks learn the result.
        verify_record_dir: folder where a passed check is recorded (a small file named by the
            split's digest and the mode), so that later runs on the same split (the next phases
            of a pipeline, a resumed job) skip it. ``lpt pipeline`` sets ``<run_dir>/verified``
            where it is not set; None: every run checks.
        pin_memory: pin host memory (only when CUDA is available). Batches hold uint8 images
            (converted to float on the device), a quarter of the bytes of float32.
        persistent_workers: keep workers alive between epochs (only with num_workers > 0).
        augment: random-resized-crop and flip for training (False: the eval transform, e.g. for
            exactness checks).
        predict_paths: images for ``lpt predict``: a folder (searched recursively) or a text file
            with one image path per line (relative to the file's folder); None = the test split.
        holdout_per_class: for a dataset without a validation split (iNaturalist 2018, CIFAR-LT
            with its official test folder): carve a seeded held-out split of up to this many
            training images per class out of train *before phase 1*, so the experts never train
            on it. It serves as ``val``: checkpoint selection, early stopping, the W_base search
            and the scorer's fitting. 0 = no carving.
        holdout_max_fraction: a class gives at most this fraction of its training images (rounded
            down), so tail classes lose little and a class too small to spare one gives none.
        holdout_seed: seed of the carving (the same on every rank and in every phase).
        val_from_test: explicit opt-in for a dataset without a validation split: report the test
            split as ``val`` during training, for monitoring only. Selection and fitting on it
            (ModelCheckpoint / EarlyStopping on ``val/...``, phase 3) are then refused.
        decode_jpeg_on_device: image files are read but not decoded by the workers: JPEGs are
            decoded on the device the batch is moved to (nvjpeg on CUDA) and cropped there with
            the same random draws (`on_after_batch_transfer`); other formats are decoded by the
            workers and only transformed on the device. For image-file sources only (in-memory
            arrays are decoded already).
        test_time: test-time augmentation of every evaluation (`TestTimeSpec`: ``augment`` none,
            flip, five_crop or ten_crop); evaluation batches then carry images [B, V, 3, S, S]
            and each expert averages its probabilities over the V views. Never in training batches.

    The test split is never used as validation otherwise: a dataset without a validation split
    needs ``holdout_per_class`` (or the explicit ``val_from_test``).
    """

    def __init__(
        self,
        source: DataSource,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        sampling: Sampling = "dual",
        images_per_class: int = 4,
        num_workers: int = 4,
        img_size: int | None = None,
        seed: int = 0,
        skip_unreadable: bool = False,
        verify_images: VerifyMode = "header",
        verify_record_dir: str | None = None,
        pin_memory: bool = True,
        persistent_workers: bool = False,
        predict_paths: str | None = None,
        augment: bool = True,
        holdout_per_class: int = 0,
        holdout_max_fraction: float = 0.2,
        holdout_seed: int = 0,
        val_from_test: bool = False,
        decode_jpeg_on_device: bool = False,
        test_time: TestTimeSpec = TestTimeSpec(),
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {batch_size}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ConfigError(f"data.eval_batch_size must be >= 1, got {eval_batch_size}")
        if sampling not in ("dual", "instance", "class_aware", "square_root"):
            raise ConfigError(
                f"data.sampling must be one of dual, instance, class_aware, square_root; got {sampling!r}"
            )
        if images_per_class < 1:
            raise ConfigError(f"data.images_per_class must be >= 1, got {images_per_class}")
        if verify_images not in ("header", "full", "off"):
            raise ConfigError(f"data.verify_images must be header, full or off; got {verify_images!r}")
        if num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {num_workers}")
        if holdout_per_class < 0:
            raise ConfigError(f"data.holdout_per_class must be >= 0, got {holdout_per_class}")
        if not 0.0 < holdout_max_fraction < 1.0:
            raise ConfigError(f"data.holdout_max_fraction must be in (0, 1), got {holdout_max_fraction}")
        if holdout_per_class and val_from_test:
            raise ConfigError("set either data.holdout_per_class (a held-out split carved from train) or "
                              "data.val_from_test (monitor the test split), not both")
        if isinstance(test_time, dict):
            test_time = TestTimeSpec(**test_time)
        # The source object is not saved: checkpoints must stay loadable with weights_only.
        self.save_hyperparameters(ignore=["source", "test_time"], logger=False)
        self.hparams["test_time"] = {"augment": test_time.augment}
        self.source = source
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.sampling = sampling
        self.images_per_class = images_per_class
        self.num_workers = num_workers
        self.img_size = img_size
        self.seed = seed
        self.skip_unreadable = skip_unreadable
        self.verify_images = verify_images
        self.verify_record_dir = verify_record_dir
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.predict_paths = predict_paths
        self.augment = augment
        self.holdout_per_class = holdout_per_class
        self.holdout_max_fraction = holdout_max_fraction
        self.holdout_seed = holdout_seed
        self.val_from_test = val_from_test
        self.decode_jpeg_on_device = decode_jpeg_on_device
        self.test_time = test_time
        self.holdout_summary: str | None = None
        self._source_train_counts: np.ndarray | None = None
        self._data_record: dict | None = None
        self._splits: DatasetSplits | None = None
        self._datasets: dict[str, LongTailImageDataset] = {}
        self._verified: set[str] = set()
        self._warned_val_from_test = False
        self._warned_test_from_val = False
        self._device_transforms: dict[bool, Callable] = {}

    # ---------------------------------------------------------------- metadata (lazy, cached)
    @property
    def splits(self) -> DatasetSplits:
        """The parsed source; parsed on first access so CLI argument links work before setup()."""
        if self._splits is None:
            self._splits = self._with_holdout(self.source.load())
        return self._splits

    def _with_holdout(self, splits: DatasetSplits) -> DatasetSplits:
        """Carve the held-out split out of train (deterministic: every rank and phase agrees)."""
        self._source_train_counts = splits.train.class_counts(splits.num_classes)
        if splits.val is not None and (self.holdout_per_class or self.val_from_test):
            option = "holdout_per_class" if self.holdout_per_class else "val_from_test"
            raise ConfigError(f"{splits.name} has a validation split ({splits.val.origin}); data.{option} is only "
                              f"for datasets without one: remove it")
        if not self.holdout_per_class:
            return splits
        train = splits.train
        held, rest = holdout_upto(train.labels, self.holdout_per_class, self.holdout_seed, self.holdout_max_fraction)
        if held.size == 0:
            raise ConfigError(f"data.holdout_per_class={self.holdout_per_class}: no class of {splits.name} can spare "
                              f"an image at data.holdout_max_fraction={self.holdout_max_fraction}")
        counts = train.class_counts(splits.num_classes)
        held_counts = np.bincount(train.labels[held], minlength=splits.num_classes)
        untouched = int((held_counts == 0).sum())
        short = int(((held_counts > 0) & (held_counts < self.holdout_per_class)).sum())
        self.holdout_summary = (
            f"held-out split carved from train (seed {self.holdout_seed}): {held.size:,} of {len(train):,} training "
            f"images, up to {self.holdout_per_class} per class; {splits.num_classes - untouched - short} classes give "
            f"{self.holdout_per_class}, {short} give fewer (at most {self.holdout_max_fraction:.0%} of theirs) and "
            f"{untouched} are too small to spare one; smallest training class now {int((counts - held_counts).min())}")
        origin = f"{train.origin} (held-out split: up to {self.holdout_per_class}/class, seed {self.holdout_seed})"
        return replace(splits, train=train.subset(rest), val=train.subset(held, origin=origin))

    @property
    def val_is_test(self) -> bool:
        """True when ``val`` reports the test split (the ``val_from_test`` opt-in)."""
        return self.splits.val is None and self.val_from_test

    def data_record(self) -> dict:
        """What every checkpoint records about its data: digests of the training and held-out
        splits. Phases 2 and 3 compare it with their own, so an expert trained on other data or on
        the held-out images is refused."""
        if self._data_record is None:
            s = self.splits
            self._data_record = {
                "dataset": s.name, "num_train": len(s.train), "train": s.train.digest(),
                "val": s.val.digest() if s.val is not None else None, "val_is_test": self.val_is_test,
                "holdout": ({"per_class": self.holdout_per_class, "max_fraction": self.holdout_max_fraction,
                             "seed": self.holdout_seed, "size": len(s.val)} if self.holdout_per_class else None),
            }
        return self._data_record

    @property
    def num_classes(self) -> int:
        return self.splits.num_classes

    @property
    def class_names(self) -> list[str]:
        return list(self.splits.class_names)

    @property
    def taxonomy(self):
        """The classes' `lpt_lightning.taxonomy.Taxonomy`, or None (sources without one)."""
        return self.splits.taxonomy

    @property
    def train_class_counts(self) -> torch.Tensor:
        """Training images per class, LongTensor [C]: the prior of the losses."""
        return torch.from_numpy(self.splits.train.class_counts(self.num_classes))

    @property
    def group_class_counts(self) -> torch.Tensor:
        """Training images per class as the dataset defines them, before a held-out split is
        carved: they define the many/medium/few groups, so tables stay comparable with published
        ones (a carved-out image must not move its class into another group)."""
        self.splits  # parsing the source (and carving) sets _source_train_counts
        return torch.from_numpy(self._source_train_counts)

    def summary(self) -> str:
        s = self.splits
        counts = s.train.class_counts(s.num_classes)
        n_max, n_min = int(counts.max()), int(counts.min())
        ratio = f"{n_max / n_min:.1f}" if n_min else "inf"
        parts = [
            f"{s.name}: {len(s.train):,} train images, {s.num_classes} classes, "
            f"max {n_max:,} / min {n_min:,} per class (imbalance ratio {ratio})"
        ]
        for split_name in ("val", "test"):
            split = getattr(s, split_name)
            parts.append(f"{split_name} {len(split):,}" if split is not None else f"no {split_name} split")
        if self.val_is_test:
            parts.append("val reports the TEST split (data.val_from_test: monitoring only)")
        if self.holdout_summary:
            parts.append(self.holdout_summary)
        return "; ".join(parts)

    # ---------------------------------------------------------------- setup
    def _resolve_img_size(self) -> int:
        if self.img_size is None:
            raise ConfigError("image size unknown: set data.img_size (lpt sets it from the model; in Python pass "
                              "img_size= or call lpt_lightning.data_facts.connect(model, datamodule))")
        return self.img_size

    def eval_split(self, wanted: str) -> tuple[str, Split]:
        """The split serving ``val`` / ``test``. Test stands in for val only under the explicit
        ``val_from_test`` opt-in; a missing test split is served by val (no leak that way)."""
        split = getattr(self.splits, wanted)
        if split is not None:
            return wanted, split
        if wanted == "val":
            if not self.val_from_test:
                raise ConfigError(
                    f"{self.splits.name} has no validation split, and the test split is never used as one "
                    "(checkpoint selection, early stopping and the phase-3 W_base/scorer fitting would see test "
                    "images). Set data.holdout_per_class (e.g. 5) to carve a held-out split out of the training "
                    "set before phase 1, or data.val_from_test=true to only monitor test accuracy while training")
            if self.splits.test is None:
                raise ConfigError(f"{self.splits.name} has neither a val nor a test split; configure one in data.source")
            if not self._warned_val_from_test:
                self._warned_val_from_test = True
                rank_zero_warn(f"{self.splits.name}: val/* metrics are TEST accuracy (data.val_from_test=true); "
                               "nothing may be selected or fitted on them")
            return "test", self.splits.test
        if self.splits.val is None:
            raise ConfigError(f"{self.splits.name} has neither a val nor a test split; configure one in data.source")
        if not self._warned_test_from_val:  # once, not on every loader rebuild
            self._warned_test_from_val = True
            rank_zero_warn(f"{self.splits.name} has no test split: using the val split for test")
        return "val", self.splits.val

    def check_selection(self) -> None:
        """Under ``val_from_test``, refuse callbacks that select on val (= test) metrics."""
        if not self.val_is_test or self.trainer is None:
            return
        from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

        for callback in self.trainer.callbacks:
            monitor = getattr(callback, "monitor", None)
            if isinstance(callback, (ModelCheckpoint, EarlyStopping)) and monitor and monitor.startswith("val"):
                raise ConfigError(
                    f"{type(callback).__name__}(monitor={monitor!r}) would select on the test split "
                    "(data.val_from_test=true reports test as val, for monitoring only): drop the monitor, "
                    "or set data.holdout_per_class to select on a held-out split instead")

    def _check_files(self, name: str, split: Split) -> None:
        if name in self._verified:
            return
        if self.verify_images != "off" and split.items and isinstance(split.items[0], str):
            self._verify_once(split)
        self._verified.add(name)

    def _verify_once(self, split: Split) -> None:
        """``verify_images`` over the ranks, each checking every world_size-th image, unless a
        record says this split passed before (rank 0 reads it, so every rank takes the same path).
        Every rank raises when any rank found a bad image."""
        world, rank = _process_group()
        record = self._verify_record(split)
        found = record is not None and rank == 0 and _record_matches(record, split)
        if _gather(found)[0]:
            rank_zero_info(f"images of {split.origin} passed data.verify_images={self.verify_images} before "
                           f"({record}); not checked again")
            return
        shard = split if world == 1 else split.subset(np.arange(rank, len(split), world))
        try:
            verify_images(shard, self.verify_images, workers=max(self.num_workers, 1), progress=rank == 0)
            problem = None
        except DataFormatError as exc:
            problem = str(exc)
        problems = [p for p in _gather(problem) if p is not None]
        if problems:
            if not self.skip_unreadable:
                raise DataFormatError("\n".join(problems))
            rank_zero_warn("\n".join(problems) + "\n(these images will be skipped: data.skip_unreadable=true)")
        elif record is not None and rank == 0:
            try:
                text = json.dumps({"origin": split.origin, "first_item": split.items[0], "images": len(split)})
                atomic_save(lambda tmp: tmp.write_text(text), record)
            except OSError as exc:
                rank_zero_warn(f"could not record the image check in {record} ({exc}); later runs check again")

    def _verify_record(self, split: Split) -> Path | None:
        """Where a passed check of ``split`` in this mode is recorded (None: not recorded)."""
        if self.verify_record_dir is None:
            return None
        return Path(os.path.expanduser(self.verify_record_dir)) / f"{split.digest()}-{self.verify_images}.json"

    def _dataset(self, name: str, split: Split, train: bool) -> LongTailImageDataset:
        key = f"{name}:{'train' if train else 'eval'}"
        if key not in self._datasets:
            size = self._resolve_img_size()
            transform = build_train_transform(size) if train and self.augment else self._eval_transform(train)
            self._check_files(name, split)
            self._datasets[key] = LongTailImageDataset(
                split, transform, images=self.splits.images, skip_unreadable=self.skip_unreadable,
                defer_decoding=self._decodes_on_device(split),
            )
        return self._datasets[key]

    def _decodes_on_device(self, split: Split) -> bool:
        """Whether the workers leave this split's JPEGs undecoded (``decode_jpeg_on_device``)."""
        files = bool(split.items) and isinstance(split.items[0], str)
        if self.decode_jpeg_on_device and not files:
            rank_zero_info(f"data.decode_jpeg_on_device: {split.origin} holds no image files; its images are "
                           "converted in the loader workers")
        return self.decode_jpeg_on_device and files

    def setup(self, stage: str | None = None) -> None:
        if self.decode_jpeg_on_device and not torch.cuda.is_available():
            rank_zero_warn("data.decode_jpeg_on_device without CUDA: JPEGs are decoded on the CPU by the main "
                           "process, slower than by the loader workers")
        # Build (and verify) up front so that a bad dataset fails before any training step.
        if stage in (None, "fit"):
            self.check_selection()
            self._dataset("train", self.splits.train, train=True)
            self._dataset(*self.eval_split("val"), train=False)
            rank_zero_info(self.summary())
        if stage == "validate":
            self._dataset(*self.eval_split("val"), train=False)
        if stage in (None, "test", "predict"):
            self._dataset(*self.eval_split("test"), train=False)

    # ---------------------------------------------------------------- loaders
    def _replicas(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return int(getattr(trainer, "world_size", 1)), int(getattr(trainer, "global_rank", 0))

    def _loader_options(self) -> dict[str, Any]:
        workers = self.num_workers
        return dict(num_workers=workers, pin_memory=self.pin_memory and torch.cuda.is_available(),
                    persistent_workers=self.persistent_workers and workers > 0)

    def _collate(self) -> Callable[[list], dict]:
        return collate_skipping if self.skip_unreadable else collate_images

    def _loader(self, dataset: LongTailImageDataset, sampler: Sampler, batch_size: int, drop_last: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                          collate_fn=self._collate(), **self._loader_options())

    def train_sampler(self, kind: str) -> Sampler:
        """A fresh sampler of one stream: "cb" class-aware, "ib" instance, "sqrt" square-root.

        It yields `Draw` keys, so that each draw gets an augmentation of its own."""
        num_replicas, rank = self._replicas()
        labels = self.splits.train.labels
        common = dict(num_replicas=num_replicas, rank=rank, draw_keys=True)
        if kind == "cb":
            return ClassAwareSampler(labels, images_per_class=self.images_per_class, seed=self.seed, **common)
        if kind == "ib":
            # A different seed offset keeps the two streams (and their augmentations) apart.
            return InstanceSampler(labels, seed=self.seed + 1_000_003, **common)
        if kind == "sqrt":
            return PowerSampler(labels, power=0.5, seed=self.seed, **common)
        raise ConfigError(f"unknown sampler kind {kind!r}")

    def train_dataloader(self) -> TrainingDataLoader:
        """One loader for all streams of the sampling: a batch is ``{stream: {"image", "label",
        "index"}}`` ("cb" and "ib" for dual sampling, each of ``batch_size`` images), built by one
        worker from a `StreamBatchSampler` step. Both dual streams sample N indices per epoch, so
        an epoch has N // batch_size steps per device."""
        dataset = self._dataset("train", self.splits.train, train=True)
        streams = {kind: self.train_sampler(kind) for kind in STREAMS[self.sampling]}
        return self.stream_loader(StreamBatches(dataset, self._collate()), streams, self.batch_size,
                                  "training samples", **self._loader_options())

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With ``decode_jpeg_on_device``: decode and transform the batch's images where it now is
        (training batches with the training transform and each draw's seed)."""
        if not self.decode_jpeg_on_device:
            return batch
        training = self.trainer is not None and bool(self.trainer.training)
        if training not in self._device_transforms:
            size = self._resolve_img_size()
            self._device_transforms[training] = (build_train_transform(size) if training and self.augment
                                                 else self._eval_transform(training))
        return _decode_streams(batch, self._device_transforms[training], self.skip_unreadable)

    def _eval_loader(self, wanted: str) -> DataLoader:
        name, split = self.eval_split(wanted)
        return self._sharded_loader(self._dataset(name, split, train=False))

    def _sharded_loader(self, dataset: LongTailImageDataset) -> DataLoader:
        num_replicas, rank = self._replicas()
        sampler = ShardedEvalSampler(len(dataset), num_replicas=num_replicas, rank=rank)
        return self._loader(dataset, sampler, self.eval_batch_size, drop_last=False)

    def _eval_transform(self, train: bool = False) -> Callable:
        """The eval transform; for evaluation (not for training batches) with the test-time views."""
        return build_eval_transform(self._resolve_img_size(), "none" if train else self.test_time.augment)

    def split_dataloader(self, name: str, views: bool = True) -> DataLoader:
        """Images of split ``train``, ``val`` or ``test`` with the eval transform, this rank's shard
        without padding: for model outputs over a whole split. Batches' ``index`` values are
        indices into the split. ``views``: with the test-time views (``data.test_time``)."""
        if name == "train":
            split = self.splits.train
        else:
            name, split = self.eval_split(name)
        self._check_files(name, split)
        # A dataset of its own that never defers decoding: these batches are consumed outside the
        # training loop (the class-mean head init, phase 3's outputs pass), without the transfer hook.
        dataset = LongTailImageDataset(split, self._eval_transform(train=not views),
                                       images=self.splits.images, skip_unreadable=self.skip_unreadable)
        return self._sharded_loader(dataset)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        if self.predict_paths is None:
            return self._eval_loader("test")
        if "predict" not in self._datasets:
            split = image_paths_split(self.predict_paths)
            self._check_files("predict", split)
            self._datasets["predict"] = LongTailImageDataset(
                split, self._eval_transform(), skip_unreadable=self.skip_unreadable,
                defer_decoding=self._decodes_on_device(split),
            )
        return self._sharded_loader(self._datasets["predict"])

    @property
    def training_items(self) -> list:
        """What training batches' ``index`` values refer to (messages name a bad batch's images)."""
        return self.splits.train.items

    def predict_items(self) -> list:
        """What the predict loader's ``index`` values refer to (image paths or split indices)."""
        if self.predict_paths is not None:
            return list(self._datasets["predict"].split.items)
        return list(self.eval_split("test")[1].items)


def _decode_streams(batch: Any, transform: Callable, skip_unreadable: bool) -> Any:
    """`decode_on_device` on a batch, or on each stream of a training batch."""
    if not isinstance(batch, dict):
        return batch
    if "image_data" in batch:
        return decode_on_device(batch, transform, skip_unreadable)
    return {k: _decode_streams(v, transform, skip_unreadable) for k, v in batch.items()}


def image_paths_split(path: str) -> Split:
    """Unlabelled images (label -1) from a folder or a list file, for prediction."""
    root = Path(os.path.expanduser(path))
    if root.is_dir():
        items = sorted(str(f) for f in root.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if not items:
            raise ConfigError(f"data.predict_paths={path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in that folder")
    elif root.is_file():
        # One path per line (spaces allowed); a trailing integer label, as in a training list, is ignored.
        entries = [(n, line.strip()) for n, line in enumerate(_read_lines(root), start=1) if line.strip()]
        paths = [_strip_label(line) for _, line in entries]
        items = [p if os.path.isabs(p) else str(root.parent / p) for p in paths]
        if not items:
            raise ConfigError(f"data.predict_paths={path}: the list file is empty")
        return Split(items=items, labels=np.full(len(items), -1, dtype=np.int64), origin=str(root),
                     positions=np.array([n for n, _ in entries]))
    else:
        raise ConfigError(f"data.predict_paths={path}: no such folder or list file")
    return Split(items=items, labels=np.full(len(items), -1, dtype=np.int64), origin=str(root))


def _strip_label(line: str) -> str:
    fields = line.rsplit(maxsplit=1)
    return fields[0] if len(fields) == 2 and fields[1].lstrip("-").isdigit() else line


def _process_group() -> tuple[int, int]:
    """(world size, rank) of the default process group; (1, 0) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _gather(value: Any) -> list[Any]:
    """``value`` of every rank, in rank order (``[value]`` without a process group)."""
    world, _ = _process_group()
    if world == 1:
        return [value]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, value)
    return out


def _record_matches(record: Path, split: Split) -> bool:
    """A record applies to the split at this location: the digest ignores where the dataset is
    mounted, and a copy elsewhere has files of its own to check."""
    try:
        return json.loads(record.read_text()).get("first_item") == split.items[0]
    except (OSError, ValueError, AttributeError):
        return False
