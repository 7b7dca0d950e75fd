"""Phase 3, part 2: a DataModule over the experts' cached outputs (memory-mapped, never loaded whole).

The prediction pass (`lpt_lightning.expert_outputs`) writes each split into one directory:
``manifest.json`` plus, per rank ``r`` of ``W``, ``rank{r}-of-{W}.{array}.npy`` holding that
rank's evaluation shard ``range(r, N, W)`` (so global row ``i`` is row ``i // W`` of shard
``i % W``). The manifest is written last: a directory without one is an interrupted pass.

Every rank reads every shard (the scorer's sampler draws from the whole split), so on several
nodes the cache directory must be on a filesystem all nodes share (the run directory of a cluster
job normally is); a missing shard is reported as such.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from lpt_lightning.data.datasets import StreamBatches
from lpt_lightning.data.samplers import ShardedEvalSampler
from lpt_lightning.data.training_streams import Sampling, TrainingStreams, trainer_replicas
from lpt_lightning.errors import CacheError, ConfigError

OUTPUTS_FORMAT = 2
MANIFEST = "manifest.json"


def shard_file(directory: Path, rank: int, world_size: int, array: str) -> Path:
    return directory / f"rank{rank}-of-{world_size}.{array}.npy"


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CacheError(f"{path}: no expert outputs here (the prediction pass has not finished)") from None
    except (OSError, ValueError) as exc:
        raise CacheError(f"{path}: unreadable expert-output manifest ({exc}); delete {directory} to "
                              "recompute") from None
    if not isinstance(manifest, dict) or manifest.get("format") != OUTPUTS_FORMAT:
        raise CacheError(f"{path}: not an expert-output manifest of format {OUTPUTS_FORMAT}; delete "
                              f"{directory} to recompute")
    return manifest


class CachedSplit:
    """One split's cached expert outputs: ``rows(indices)`` gathers rows from the memory-mapped
    rank shards; nothing is read before it is asked for."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self.num_rows = int(self.manifest["num_rows"])
        self.world_size = int(self.manifest["world_size"])
        self.arrays: dict[str, list[np.ndarray | None]] = {}
        for name, spec in self.manifest["arrays"].items():
            self.arrays[name] = [self._open(r, name, spec) for r in range(self.world_size)]

    def _open(self, rank: int, name: str, spec: dict[str, Any]) -> np.ndarray | None:
        rows = len(range(rank, self.num_rows, self.world_size))
        if rows == 0:
            return None
        path = shard_file(self.directory, rank, self.world_size, name)
        if not path.is_file():
            raise CacheError(
                f"{path}: missing; rank {rank} wrote it. On several nodes the expert-output cache must be on a "
                "filesystem every node sees (a shared run directory, or model.init_args.cache_dir there)")
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)  # never unpickles
        except Exception as exc:
            raise CacheError(f"{path}: unreadable expert-output cache ({exc}); delete {self.directory} to "
                                  "recompute") from None
        if array.shape != (rows, *spec["shape"]) or str(array.dtype) != spec["dtype"]:
            raise CacheError(f"{path}: holds {array.dtype}{list(array.shape)}, the manifest says "
                                  f"{spec['dtype']}{[rows, *spec['shape']]}; delete {self.directory} to recompute")
        return array

    @property
    def labels(self) -> np.ndarray:
        return self.rows(np.arange(self.num_rows), ("label",))["label"].numpy()

    def rows(self, indices: np.ndarray, names: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """Rows ``indices`` of every array (or of ``names``), as tensors; floating arrays as float32."""
        indices = np.asarray(indices, dtype=np.int64)
        shard, position = indices % self.world_size, indices // self.world_size
        out = {}
        for name in names or self.arrays:
            spec = self.manifest["arrays"][name]
            values = np.empty((len(indices), *spec["shape"]), dtype=spec["dtype"])
            for r in np.unique(shard):
                take = shard == r
                values[take] = self.arrays[name][r][position[take]]
            tensor = torch.from_numpy(values)
            out[name] = tensor.float() if tensor.is_floating_point() else tensor
        out["index"] = torch.from_numpy(indices)
        return out


class CachedOutputsDataset(Dataset):
    """Batches of cached rows: the loader hands whole index lists to ``__getitems__``."""

    def __init__(self, split: CachedSplit):
        self.split = split

    def __len__(self) -> int:
        return self.split.num_rows

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.split.rows(np.array([int(index)])).items()}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return self.split.rows(np.asarray(indices))


def _batch(rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return rows  # __getitems__ already returns a batch




class CachedOutputsDataModule(LightningDataModule):
    """The scorer's data: its fitting split and the held-out split, as cached expert outputs.

    Args:
        outputs: split name (``train``, ``val``) -> directory written by the prediction pass.
        fit_split: the split the training loader samples (``val``: the held-out split, default).
        batch_size, eval_batch_size, sampling, images_per_class, seed: as in `LongTailDataModule`;
            the training streams use the same samplers and seeds, so they draw the same indices
            the image data's loaders would.

    The class counts (many/medium/few groups), class names and data record come from the image
    data, recorded in the manifests when the outputs were computed.
    """

    def __init__(self, outputs: Mapping[str, str | Path], fit_split: Literal["val", "train"] = "val",
                 batch_size: int = 128, eval_batch_size: int | None = None, sampling: Sampling = "class_aware",
                 images_per_class: int = 4, seed: int = 0):
        super().__init__()
        if "val" not in outputs or fit_split not in outputs:
            raise ConfigError(f"CachedOutputsDataModule needs the 'val' split and the fitting split "
                              f"'{fit_split}', got {sorted(outputs)}")
        # The image data's samplers and seeds (without augmentation keys): the same index sequence.
        self.training_streams = TrainingStreams(sampling, batch_size, images_per_class, seed, draw_keys=False)
        self.splits = {name: CachedSplit(path) for name, path in outputs.items()}
        self.fit_split = fit_split
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        facts = self.splits["val"].manifest["data"]
        for split in self.splits.values():
            if split.manifest["data"] != facts:
                raise CacheError(f"{split.directory}: computed for other data than {self.splits['val'].directory}; "
                                      "delete the stale one to recompute")
        self._facts = facts

    # ---------------------------------------------------------------- what the image data recorded
    @property
    def num_classes(self) -> int:
        return len(self._facts["class_counts"])

    @property
    def class_names(self) -> list[str]:
        return list(self._facts["class_names"])

    @property
    def group_class_counts(self) -> torch.Tensor:
        return torch.tensor(self._facts["class_counts"], dtype=torch.long)

    def data_record(self) -> dict[str, Any]:
        return self._facts["record"]

    # ---------------------------------------------------------------- loaders
    def train_dataloader(self) -> DataLoader:
        split = self.splits[self.fit_split]
        return self.training_streams.loader(StreamBatches(CachedOutputsDataset(split), _batch), split.labels,
                                            *trainer_replicas(self.trainer), f"samples of the {self.fit_split} split the scorer "
                                            "is fitted on")

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: the resume state of the training data (`TrainingStreams`)."""
        return self.training_streams.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.training_streams.load_state_dict(state_dict)

    def _eval_loader(self, name: str) -> DataLoader:
        num_replicas, rank = trainer_replicas(self.trainer)
        split = self.splits[name]
        sampler = ShardedEvalSampler(split.num_rows, num_replicas=num_replicas, rank=rank)
        return DataLoader(CachedOutputsDataset(split), batch_size=self.eval_batch_size, sampler=sampler,
                          collate_fn=_batch)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def heldout_batches(self, batch_size: int | None = None):
        """The whole held-out split in order (every rank sees all of it), batch by batch."""
        split = self.splits["val"]
        step = batch_size or self.eval_batch_size
        for start in range(0, split.num_rows, step):
            yield split.rows(np.arange(start, min(start + step, split.num_rows)))
