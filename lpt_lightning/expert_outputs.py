"""Phase 3, part 1: both frozen experts' outputs over whole splits, computed once.

`ExpertOutputs` (a LightningModule holding the two experts) runs through Lightning's predict loop
over the image data's evaluation loaders (eval transform, each rank its unpadded shard), and
`ExpertOutputsWriter` writes every rank's rows straight into memory-mapped ``.npy`` files
(logits and query features in ``float16`` by default), then a manifest; the scorer's
`CachedOutputsDataModule` reads them back. A split's directory is named by a content key (both
experts' trained tensors and specs, the split's images and labels, image size, storage dtype, test-time
views: a view-averaged cache holds `view_outputs`, log(mean probability) / scale), so a
finished pass is reused and anything else recomputes; files are renamed into place only when
complete, and the manifest comes last, so an interrupted pass is simply recomputed.

The pass runs on the trainer the user configured (its strategy, process group, devices and
precision), before its fit: no second trainer. The ranks agree after each step of the writing
(a collective, which is also the barrier), so an error on one rank stops every rank at once
instead of leaving the others waiting until the process group's timeout.

Multi-node: every rank writes its own shard and rank 0 writes the manifest after checking all
shards are visible, so the cache directory must be on a filesystem shared by all nodes; a rank
that cannot see the others' files stops with a message saying so.

`scorer_fit_data` puts the three parts together: ``lpt fit`` of `MoEScorerPhase` calls it, and so
does plain Python, ``trainer.fit(model, datamodule=scorer_fit_data(model, images, trainer))``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, ProgressBar
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lpt_lightning.checkpoints.files import atomic_save
from lpt_lightning.checkpoints.metadata import check_same_data, is_saved_key
from lpt_lightning.data.cached_outputs import (
    MANIFEST,
    OUTPUTS_FORMAT,
    CachedOutputsDataModule,
    read_manifest,
    shard_file,
)
from lpt_lightning.errors import CacheError, ConfigError
from lpt_lightning.models.expert import view_outputs


def expert_digest(expert: nn.Module, record: dict[str, Any]) -> str:
    """Identity of a trained expert: its spec record and every trained tensor (not the backbone,
    which its spec names)."""
    h = hashlib.sha256(json.dumps(record, sort_keys=True).encode())
    for key, value in sorted(expert.state_dict().items()):
        if is_saved_key(key):
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def outputs_key(expert_digests: list[str], split_digest: str, img_size: int, label_only: bool, dtype: str,
                augment: str = "none") -> str:
    """Changes whenever an expert, the split's images/labels or the stored view of them (size,
    dtype, test-time augmentation) changes. Without test-time views the key is that of caches
    written before the option existed."""
    views = "" if augment == "none" else f"|tta={augment}"
    text = f"v{OUTPUTS_FORMAT}|{img_size}|{label_only}|{dtype}|{'|'.join(expert_digests)}|{split_digest}{views}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def ensure_disk_space(directory: Path, needed_bytes: int) -> None:
    """Refuse to start an inference pass whose result cannot be stored (checked up front)."""
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < 1.1 * needed_bytes:
        raise ConfigError(f"expert-output cache needs about {needed_bytes / 1e9:.2f} GB in {directory}, "
                          f"only {free / 1e9:.2f} GB are free; set model.init_args.cache_dir to a larger disk")


class ExpertOutputs(L.LightningModule):
    """Both frozen experts; ``predict_step`` returns per image its index, label, and per expert the
    query feature and the logits (or, for a ``label_only`` loader, only the probability of the
    true label, all a scorer fitted on that split needs)."""

    def __init__(self, experts: dict[str, nn.Module], logit_scales: dict[str, float], label_only: list[bool]):
        super().__init__()
        self.experts = nn.ModuleDict(experts)
        self.logit_scales = dict(logit_scales)
        self.label_only = list(label_only)
        self.experts.requires_grad_(False)

    @property
    def img_size(self) -> int:
        return self.experts["visual"].img_size

    def on_predict_start(self) -> None:
        self.experts.eval()  # no dropout: cached outputs must be deterministic

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
                     ) -> dict[str, torch.Tensor]:
        labels = batch["label"]
        row = {"index": batch["index"], "label": labels}
        for name, expert in self.experts.items():
            logits, row[f"{name}.query"] = view_outputs(expert, batch["image"], self.logit_scales[name])
            if self.label_only[dataloader_idx]:
                probs = torch.softmax(self.logit_scales[name] * logits, dim=-1)
                row[f"{name}.prob_label"] = probs.gather(1, labels.clamp_min(0)[:, None]).squeeze(1)
            else:
                row[f"{name}.logits"] = logits
        return row


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


class ExpertOutputsWriter(BasePredictionWriter):
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


class SplitImages(L.LightningDataModule):
    """The prediction pass's loaders: the image data's eval loaders over whole splits, this rank's
    unpadded shard each."""

    def __init__(self, images: L.LightningDataModule, splits: list[str]):
        super().__init__()
        self.images, self.names = images, splits

    def predict_dataloader(self):
        self.images.trainer = self.trainer  # ranks (and image size) of this pass
        return [self.images.split_dataloader(name) for name in self.names]


def complete(directory: Path, key: str) -> bool:
    if not (directory / MANIFEST).is_file():
        return False
    try:
        return read_manifest(directory).get("key") == key
    except CacheError as exc:
        rank_zero_info(f"{exc}; recomputing")
        return False


def write_expert_outputs(experts: dict[str, nn.Module], logit_scales: dict[str, float], digests: list[str],
                         images, splits: dict[str, bool], root: Path, facts: dict[str, Any], trainer: L.Trainer,
                         dtype: str = "float16") -> dict[str, Path]:
    """Directories of the outputs over ``splits`` (name -> label only), computed where missing in one
    pass of ``trainer``'s predict loop (the trainer the fit then runs on)."""
    img_size = experts["visual"].img_size
    found, todo = {}, []
    for name, label_only in splits.items():
        split_name, split = ("train", images.splits.train) if name == "train" else images.eval_split(name)
        augment = images.test_time.augment
        key = outputs_key(digests, split.digest(), img_size, label_only, dtype, augment)
        directory = root / f"{split_name}-{key}"
        found[name] = directory
        if not complete(directory, key):
            manifest = {"key": key, "split": split_name, "label_only": label_only, "dtype": dtype, "img_size": img_size,
                        "test_time_augment": augment, "experts": digests, "logit_scales": logit_scales,
                        "data": facts}
            todo.append((name, label_only, OutputsTarget(split_name, directory, len(split), manifest)))
    if not todo:
        return found
    per_value = np.dtype(dtype).itemsize
    needed = sum(t.num_rows * (16 + sum(per_value * e.backbone.feature_dim + (4 if lo else per_value * e.num_classes)
                                        for e in experts.values())) for _, lo, t in todo)
    ensure_disk_space(root, needed)
    for _, _, target in todo:
        rank_zero_info(f"phase 3: computing expert outputs for the {target.name} split -> {target.directory}")
    module = ExpertOutputs(experts, logit_scales, [lo for _, lo, _ in todo])
    writer = ExpertOutputsWriter([t for _, _, t in todo], dtype)
    # The fit's own trainer: its strategy starts the processes and the process group (the user's
    # backend and timeout) here, and the fit reuses them. Only its progress bar joins the writer:
    # the other callbacks (checkpoints, prediction writers) are the fit's.
    callbacks = trainer.callbacks
    trainer.callbacks = [c for c in callbacks if isinstance(c, ProgressBar)] + [writer]
    try:
        trainer.predict(module, datamodule=SplitImages(images, [n for n, _, _ in todo]), return_predictions=False)
    finally:
        trainer.callbacks = callbacks
    return found


def scorer_fit_data(model, images, trainer: L.Trainer) -> CachedOutputsDataModule:
    """What `MoEScorerPhase` fits on: the protocol checks, the prediction pass where its outputs are
    missing (on ``trainer``, the one the fit runs on), the cached-output DataModule, and W_base
    searched on the held-out split (a resumed run restores the W_base it searched before).

    ``lpt fit`` calls it; in Python::

        trainer.fit(model, datamodule=scorer_fit_data(model, images, trainer))
    """
    if images.val_is_test:
        raise ConfigError("phase 3 searches W_base and fits the scorer on the validation split, which is the "
                          "TEST split here (data.val_from_test=true): set data.holdout_per_class instead, in "
                          "every phase, so the experts never train on the held-out images")
    model.build_experts()
    record = images.data_record()
    for kind, info in model.expert_info.items():
        check_same_data(info["data"], record, f"model.{kind}_checkpoint={info['source']}")
    fit_split = model.fit_split
    splits = {fit_split: fit_split == "train", "val": False}
    facts = {"class_counts": images.group_class_counts.tolist(), "class_names": images.class_names, "record": record}
    root = Path(model.cache_dir or Path(trainer.default_root_dir) / "expert_cache")
    experts = model.experts()
    directories = write_expert_outputs(experts, model.scales, [model.expert_info[k]["digest"] for k in experts],
                                       images, splits, root, facts, trainer, model.outputs_dtype)
    data = CachedOutputsDataModule(directories, fit_split=fit_split, batch_size=images.batch_size,
                                   eval_batch_size=images.eval_batch_size, sampling=images.sampling,
                                   images_per_class=images.images_per_class, seed=images.seed)
    model.use_data(data.group_class_counts, data.data_record())
    model.search_base_weight(data.heldout_batches())
    return data
