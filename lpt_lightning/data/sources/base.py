"""What every dataset source returns (`Split`, `DatasetSplits`), its base class, and the small
helpers the per-format modules share (path checks, text lines, hold-out + long-tail)."""
from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lpt_lightning.data.long_tail import cap_per_class, make_long_tailed, target_slices
from lpt_lightning.errors import DataFormatError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass
class Split:
    """One split: ``items[i]`` is an image path (str) or an int index into DatasetSplits.images."""

    items: list
    labels: np.ndarray
    origin: str = ""  # where the split was read from, quoted in error messages
    # Where each item is written in ``origin`` (a list file's line number, a json's images[] index),
    # so that errors about one image can point at the entry to fix.
    positions: np.ndarray | None = None
    position_format: str = "line {}"

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if len(self.items) != self.labels.size:
            raise DataFormatError(
                f"split from {self.origin or '?'}: {len(self.items)} items but {self.labels.size} labels"
            )
        if self.positions is not None:
            self.positions = np.asarray(self.positions, dtype=np.int64).reshape(-1)

    def where(self, i: int) -> str:
        """``origin, line N`` of item ``i`` (just ``origin`` when positions are unknown)."""
        if self.positions is None:
            return self.origin
        return f"{self.origin}, {self.position_format.format(int(self.positions[i]))}"

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, indices: np.ndarray, origin: str | None = None) -> Split:
        indices = np.asarray(indices, dtype=np.int64)
        return Split(
            items=[self.items[int(i)] for i in indices],
            labels=self.labels[indices],
            origin=self.origin if origin is None else origin,
            positions=None if self.positions is None else self.positions[indices],
            position_format=self.position_format,
        )

    def class_counts(self, num_classes: int) -> np.ndarray:
        return np.bincount(self.labels, minlength=num_classes).astype(np.int64)

    def digest(self) -> str:
        """Identity of the split's images and labels (recorded in checkpoints, compared across phases).

        Paths count relative to their common folder, so the same dataset mounted elsewhere (another
        cluster, a copied tree) has the same digest."""
        items = [str(i) for i in self.items]
        if items and isinstance(self.items[0], str):
            base = os.path.dirname(os.path.commonprefix(items))
            items = [i[len(base):] for i in items]
        h = hashlib.sha256("\n".join(items).encode())
        h.update(self.labels.tobytes())
        return h.hexdigest()[:16]


@dataclass
class DatasetSplits:
    name: str
    train: Split
    val: Split | None
    test: Split | None
    class_names: list[str]
    images: np.ndarray | None = field(default=None, repr=False)  # [N,H,W] or [N,H,W,3] uint8
    taxonomy: Any = field(default=None, repr=False)  # lpt_lightning.taxonomy.Taxonomy where the source has one

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class DataSource:
    """Base class of all sources (lets LightningCLI pick one with ``class_path``).

    A source is a plain class with a typed ``__init__`` so jsonargparse can build it from YAML
    (``class_path: lpt_lightning.data.AnnotationListSource``). ``load()`` only reads metadata (paths
    and labels); images are decoded lazily by the dataset."""

    name: str = "dataset"

    def load(self) -> DatasetSplits:  # pragma: no cover - interface
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# helpers


def resolve_path(path: str | os.PathLike, root: Path) -> Path:
    path = Path(os.path.expanduser(str(path)))
    return path if path.is_absolute() else root / path


def require_dir(path: Path, option: str) -> None:
    if not path.is_dir():
        raise DataFormatError(f"dataset directory {path} does not exist; set {option} to the dataset location")


def require_file(path: Path, option: str) -> None:
    if not path.is_file():
        raise DataFormatError(f"annotation file {path} does not exist; set {option} (absolute or relative to root)")


def check_no_empty_class(
    labels: np.ndarray, num_classes: int, origin: str, class_names: list[str] | None = None
) -> None:
    """Every class in [0, num_classes) must have a label. Never allocates num_classes entries:
    a stray label like 10**12 must give this error, not a MemoryError."""
    present = np.unique(labels)
    n_empty = num_classes - present.size
    if n_empty > 0:
        # at most present.size classes lie below present.size + 10, so the first 10 empty ones are there
        empty = np.setdiff1d(np.arange(min(num_classes, present.size + 10)), present)[:10]
        shown = ", ".join(f"{int(c)} ({class_names[c]!r})" if class_names else str(int(c)) for c in empty)
        more = f" and {n_empty - 10} more" if n_empty > 10 else ""
        raise DataFormatError(f"{origin}: class {shown}{more} has no training images")


def read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file (universal newlines, as ``open`` reads them; a byte-order
    mark, as Windows editors write, is dropped instead of becoming part of the first path)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_no = data.count(b"\n", 0, exc.start) + 1
        raise DataFormatError(
            f"{path}, line {line_no}: not UTF-8 text ({exc.reason} at byte {exc.start}); save the file as UTF-8"
        ) from None
    return io.StringIO(text.removeprefix("\ufeff"), newline=None).readlines()


def holdout_and_long_tail(
    full: Split,
    val_per_class: int,
    test_per_class: int,
    imbalance_ratio: float | None,
    max_per_class: int | None,
    seed: int,
    train_pool_per_class: int | None = None,
    class_order_seed: int | None = None,
) -> tuple[Split, Split | None, Split | None]:
    """Carve balanced val/test slices first (and a training pool, see ``target_slices``), then
    long-tail (or cap) what remains."""
    val = test = None
    try:
        val_idx, test_idx, rest, _ = target_slices(full.labels, val_per_class, test_per_class,
                                                   train_pool_per_class, seed)
        if val_per_class:
            val = full.subset(val_idx, origin=f"{full.origin} (balanced val slice, {val_per_class}/class)")
        if test_per_class:
            test = full.subset(test_idx, origin=f"{full.origin} (balanced test slice, {test_per_class}/class)")
    except DataFormatError as exc:
        raise DataFormatError(
            f"{full.origin}: {exc}; lower val_per_class / test_per_class (now {val_per_class} / {test_per_class})"
        ) from None
    try:
        if imbalance_ratio is not None:
            rest = rest[make_long_tailed(full.labels[rest], imbalance_ratio, seed, max_per_class, class_order_seed)]
        elif max_per_class is not None:
            rest = rest[cap_per_class(full.labels[rest], max_per_class, seed)]
    except DataFormatError as exc:
        raise DataFormatError(f"{full.origin}: {exc}") from None
    return full.subset(rest), val, test

