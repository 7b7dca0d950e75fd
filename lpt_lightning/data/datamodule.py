"""The LightningDataModule of long-tailed image classification: datasets and loaders of every stage."""
from __future__ import annotations

from typing import Any, Callable

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Sampler

from lpt_lightning.data.datasets import LongTailImageDataset, StreamBatches, collate_images, collate_skipping
from lpt_lightning.data.device_decode import decode_streams
from lpt_lightning.data.image_checks import VerifyMode, verify_split_on_ranks
from lpt_lightning.data.predict_images import image_paths_split
from lpt_lightning.data.protocol import SplitProtocol
from lpt_lightning.data.samplers import ShardedEvalSampler
from lpt_lightning.data.sources import DatasetSplits, DataSource, Split
from lpt_lightning.data.training_streams import Sampling, TrainingDataLoader, TrainingStreams, trainer_replicas
from lpt_lightning.data.transforms import TestTimeSpec, build_eval_transform, build_train_transform
from lpt_lightning.errors import ConfigError


class LongTailDataModule(LightningDataModule):
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
        if images_per_class < 1:
            raise ConfigError(f"data.images_per_class must be >= 1, got {images_per_class}")
        self.training_streams = TrainingStreams(sampling, batch_size, images_per_class, seed, draw_keys=True)
        if verify_images not in ("header", "full", "off"):
            raise ConfigError(f"data.verify_images must be header, full or off; got {verify_images!r}")
        if num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {num_workers}")
        self.protocol = SplitProtocol(source, holdout_per_class, holdout_max_fraction, holdout_seed, val_from_test)
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
        self.decode_jpeg_on_device = decode_jpeg_on_device
        self.test_time = test_time
        self._datasets: dict[str, LongTailImageDataset] = {}
        self._verified: set[str] = set()
        self._device_transforms: dict[bool, Callable] = {}

    # ---------------------------------------------------------------- the splits (`SplitProtocol`)
    @property
    def splits(self) -> DatasetSplits:
        """The parsed source; parsed on first access so CLI argument links work before setup()."""
        return self.protocol.splits

    @property
    def holdout_summary(self) -> str | None:
        return self.protocol.holdout_summary

    @property
    def val_is_held_out(self) -> bool:
        """True when val is a split of its own and test another: what may be tuned on without
        touching test (e.g. the test-prior tau)."""
        return self.splits.val is not None and self.splits.test is not None

    @property
    def val_is_test(self) -> bool:
        """True when ``val`` reports the test split (the ``val_from_test`` opt-in)."""
        return self.protocol.val_is_test

    def data_record(self) -> dict:
        return self.protocol.data_record()

    def summary(self) -> str:
        return self.protocol.summary()

    def eval_split(self, wanted: str) -> tuple[str, Split]:
        return self.protocol.eval_split(wanted)

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
        return self.protocol.group_class_counts

    # ---------------------------------------------------------------- datasets
    def _resolve_img_size(self) -> int:
        if self.img_size is None:
            raise ConfigError("image size unknown: set data.img_size (lpt sets it from the model; in Python pass "
                              "img_size= or call lpt_lightning.data_facts.connect(model, datamodule))")
        return self.img_size

    def _check_files(self, name: str, split: Split) -> None:
        if name in self._verified:
            return
        if self.verify_images != "off" and split.items and isinstance(split.items[0], str):
            verify_split_on_ranks(split, self.verify_images, max(self.num_workers, 1), self.skip_unreadable,
                                  self.verify_record_dir)
        self._verified.add(name)

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
            if self.trainer is not None and self.val_is_test:
                self.protocol.check_selection(self.trainer.callbacks)
            self._dataset("train", self.splits.train, train=True)
            self._dataset(*self.eval_split("val"), train=False)
            rank_zero_info(self.summary())
        if stage == "validate":
            self._dataset(*self.eval_split("val"), train=False)
        if stage in (None, "test", "predict"):
            self._dataset(*self.eval_split("test"), train=False)

    # ---------------------------------------------------------------- loaders
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
        return self.training_streams.sampler(kind, self.splits.train.labels, *trainer_replicas(self.trainer))

    def train_dataloader(self) -> TrainingDataLoader:
        """One loader for all streams of the sampling: a batch is ``{stream: {"image", "label",
        "index"}}`` ("cb" and "ib" for dual sampling, each of ``batch_size`` images), built by one
        worker from a `StreamBatchSampler` step. Both dual streams sample N indices per epoch, so
        an epoch has N // batch_size steps per device."""
        dataset = self._dataset("train", self.splits.train, train=True)
        return self.training_streams.loader(StreamBatches(dataset, self._collate()), self.splits.train.labels,
                                            *trainer_replicas(self.trainer), "training samples", **self._loader_options())

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: the resume state of the training data (`TrainingStreams`)."""
        return self.training_streams.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.training_streams.load_state_dict(state_dict)

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
        return decode_streams(batch, self._device_transforms[training], self.skip_unreadable)

    def _eval_loader(self, wanted: str) -> DataLoader:
        name, split = self.eval_split(wanted)
        return self._sharded_loader(self._dataset(name, split, train=False))

    def _sharded_loader(self, dataset: LongTailImageDataset) -> DataLoader:
        num_replicas, rank = trainer_replicas(self.trainer)
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
