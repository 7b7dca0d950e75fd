"""Phase 3, step 1: both frozen experts' outputs over whole splits, computed once into the cache.

`ExpertRowsPredictor` (a LightningModule holding the two experts) runs through Lightning's predict
loop over the image data's evaluation loaders (eval transform, each rank its unpadded shard), and
`ExpertCacheWriter` (`lpt_lightning.expert_cache_writer`) writes every rank's rows straight into
memory-mapped ``.npy`` files (logits and query features in ``float16`` by default), then a
manifest; the scorer's `CachedOutputsDataModule` reads them back. A split's directory is named by
a content key (both experts' trained tensors and specs, the split's images and labels, image size,
storage dtype, test-time views: a view-averaged cache holds `view_outputs`, log(mean probability)
/ scale), so a finished pass is reused and anything else recomputes; files are renamed into place
only when complete, and the manifest comes last, so an interrupted pass is simply recomputed.

The pass runs on the trainer the user configured (its strategy, process group, devices and
precision), before its fit: no second trainer. `lpt_lightning.phases.moe_scorer.scorer_fit_data`
calls it as the first step of phase 3.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lpt_lightning.checkpoints.metadata import is_saved_key
from lpt_lightning.data.cached_outputs import MANIFEST, OUTPUTS_FORMAT, read_manifest
from lpt_lightning.errors import CacheError, ConfigError
from lpt_lightning.expert_cache_writer import ExpertCacheWriter, OutputsTarget
from lpt_lightning.models.expert import view_outputs


def expert_rows(experts: dict[str, nn.Module], images: torch.Tensor, scales: dict[str, float]
                ) -> dict[str, torch.Tensor]:
    """Both experts on images, or on the test-time views of each image (averaged, `view_outputs`):
    ``{kind}.logits`` and ``{kind}.query``, the rows the cache holds and evaluation on images uses."""
    rows = {}
    for kind, expert in experts.items():
        rows[f"{kind}.logits"], rows[f"{kind}.query"] = view_outputs(expert, images, scales[kind])
    return rows


def expert_probabilities(rows: dict[str, torch.Tensor], kind: str, scale: float) -> torch.Tensor:
    """An expert's class probabilities from its cached (or just computed) logits."""
    return torch.softmax(scale * rows[f"{kind}.logits"].float(), dim=-1)


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


class ExpertRowsPredictor(L.LightningModule):
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
        row = {"index": batch["index"], "label": labels} | expert_rows(self.experts, batch["image"], self.logit_scales)
        if self.label_only[dataloader_idx]:  # the true label's probability instead of all C logits
            for name in self.experts:
                probs = expert_probabilities(row, name, self.logit_scales[name])
                row[f"{name}.prob_label"] = probs.gather(1, labels.clamp_min(0)[:, None]).squeeze(1)
                del row[f"{name}.logits"]
        return row


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
    module = ExpertRowsPredictor(experts, logit_scales, [lo for _, lo, _ in todo])
    writer = ExpertCacheWriter([t for _, _, t in todo], dtype)
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
