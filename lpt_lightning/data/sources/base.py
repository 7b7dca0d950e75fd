"""Dataset sources: parse annotation files / folders / IDX files into `DatasetSplits`.

Each source is a plain class with a typed ``__init__`` so jsonargparse / LightningCLI can build
it from YAML (``class_path: lpt_lightning.data.AnnotationListSource``). ``load()`` only reads
metadata (paths and labels); images are decoded lazily by the dataset.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import math
import os
import shutil
import struct
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lpt_lightning.data.long_tail import cap_per_class, holdout_slices, make_long_tailed
from lpt_lightning.errors import DataFormatError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"


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

    def subset(self, indices: np.ndarray, origin: str | None = None) -> "Split":
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

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class DataSource:
    """Base class of all sources (lets LightningCLI pick one with ``class_path``)."""

    name: str = "dataset"

    def load(self) -> DatasetSplits:  # pragma: no cover - interface
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# helpers


def _resolve(path: str | os.PathLike, root: Path) -> Path:
    path = Path(os.path.expanduser(str(path)))
    return path if path.is_absolute() else root / path


def _require_dir(path: Path, option: str) -> None:
    if not path.is_dir():
        raise DataFormatError(f"dataset directory {path} does not exist; set {option} to the dataset location")


def _require_file(path: Path, option: str) -> None:
    if not path.is_file():
        raise DataFormatError(f"annotation file {path} does not exist; set {option} (absolute or relative to root)")


def _check_no_empty_class(
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


def _gapless_label_count(labels: np.ndarray) -> int:
    """C such that 0..C-1 all occur in ``labels`` and C does not (no allocation of max(labels))."""
    present = np.unique(labels[labels >= 0])
    gaps = np.flatnonzero(present != np.arange(present.size))
    return int(gaps[0]) if gaps.size else int(present.size)


def _read_lines(path: Path) -> list[str]:
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


# --------------------------------------------------------------------------------------------
# Places-LT / ImageNet-LT list files


def _parse_list_file(path: Path) -> tuple[list[str], np.ndarray, list[int]]:
    """Lines ``relative/path.jpg label`` -> (paths, labels, line numbers). Blank lines skipped.

    The label is the last field: everything before it is the path, which may contain spaces."""
    paths, labels, line_nos = [], [], []
    for line_no, raw in enumerate(_read_lines(path), start=1):
        line = raw.strip()
        if not line:
            continue
        fields = line.rsplit(maxsplit=1)
        if len(fields) != 2:
            raise DataFormatError(
                f"{path}, line {line_no}: expected 'relative/path.jpg label' (a path, then the label), "
                f"got {line!r}"
            )
        try:
            label = int(fields[1])
        except ValueError:
            raise DataFormatError(
                f"{path}, line {line_no}: label {fields[1]!r} is not an integer: {line!r}"
            ) from None
        if not -(2**63) <= label < 2**63:
            raise DataFormatError(f"{path}, line {line_no}: label {fields[1]!r} is out of range: {line!r}")
        # Places-LT writes paths as '/a/airfield/x.jpg': they are relative to root anyway.
        paths.append(fields[0].lstrip("/"))
        labels.append(label)
        line_nos.append(line_no)
    if not paths:
        raise DataFormatError(f"{path}: no annotation lines found")
    return paths, np.asarray(labels, dtype=np.int64), line_nos


def _parse_class_names(path: Path) -> list[str]:
    """One class per line: ``name`` (index = line order) or ``name index``.

    Places-style names ``/a/apartment_building/outdoor 8`` drop the one-letter alphabetical
    bucket directory and keep the rest (``apartment_building/outdoor``): the last component
    alone would make many classes collide ("outdoor", "indoor").
    """
    lines = [(n, raw.strip()) for n, raw in enumerate(_read_lines(path), start=1) if raw.strip()]
    if not lines:
        raise DataFormatError(f"{path}: class names file is empty")

    def split_index(line: str) -> tuple[str, int] | None:
        parts = line.rsplit(maxsplit=1)
        if len(parts) == 2:
            try:
                return parts[0], int(parts[1])
            except ValueError:
                return None
        return None

    indexed = [split_index(line) for _, line in lines]
    if all(x is not None for x in indexed):
        names: list[str | None] = [None] * len(lines)
        for (line_no, line), (name, idx) in zip(lines, indexed):
            if not 0 <= idx < len(lines) or names[idx] is not None:
                raise DataFormatError(
                    f"{path}, line {line_no}: class index {idx} is out of range or repeated "
                    f"(expected each of 0..{len(lines) - 1} once): {line!r}"
                )
            names[idx] = name
        raw_names = [str(n) for n in names]
    else:
        raw_names = [line for _, line in lines]
    return [_clean_class_path(n) for n in raw_names]


def _clean_class_path(name: str) -> str:
    parts = [p for p in name.strip("/").split("/") if p]
    if len(parts) > 1 and len(parts[0]) == 1:  # Places '/a/...' alphabetical bucket
        parts = parts[1:]
    return "/".join(parts) if parts else name


def _names_from_dirs(paths: list[str], labels: np.ndarray, num_classes: int) -> list[str]:
    """Class i is named after the common parent directory of its train images, else class_i.

    The name is the parent's last component, extended by further components only where
    that would collide (Places' many ".../indoor" and ".../outdoor" leaves).
    """
    parents: list[set[str]] = [set() for _ in range(num_classes)]
    for p, y in zip(paths, labels):
        parents[y].add(os.path.dirname(p))
    comps: list[list[str] | None] = []
    for dirs in parents:
        parent = next(iter(dirs)) if len(dirs) == 1 else ""
        parts = _clean_class_path(parent).split("/") if parent else []
        comps.append(parts or None)
    depth = [1] * num_classes
    while True:
        names = ["/".join(c[-d:]) if c else f"class_{i}" for i, (c, d) in enumerate(zip(comps, depth))]
        seen: dict[str, list[int]] = {}
        for i, n in enumerate(names):
            seen.setdefault(n, []).append(i)
        grow = [i for same in seen.values() if len(same) > 1 for i in same if comps[i] and depth[i] < len(comps[i])]
        if not grow:
            break
        for i in grow:
            depth[i] += 1
    # Whatever still collides (identical parent paths) would be ambiguous: use generic names.
    return [n if len(seen[n]) == 1 else f"class_{i}" for i, n in enumerate(names)]


class AnnotationListSource(DataSource):
    """Places-LT / ImageNet-LT style list files (``relative/path.jpg label`` per line).

    Args:
        root: image root; image paths in the lists are relative to it.
        train_list: training list file (absolute or relative to root).
        val_list: optional validation list.
        test_list: optional test list.
        class_names_file: optional file with one class per line (``name`` or ``name index``).
        name: dataset name used in summaries and logs.
    """

    def __init__(
        self,
        root: str,
        train_list: str,
        val_list: str | None = None,
        test_list: str | None = None,
        class_names_file: str | None = None,
        name: str = "annotation_list",
    ) -> None:
        self.root = root
        self.train_list = train_list
        self.val_list = val_list
        self.test_list = test_list
        self.class_names_file = class_names_file
        self.name = name

    def load(self) -> DatasetSplits:
        root = Path(os.path.expanduser(self.root))
        _require_dir(root, "data.source.init_args.root")
        files = {"train": self.train_list, "val": self.val_list, "test": self.test_list}
        parsed = {}
        for split_name, rel in files.items():
            if rel is None:
                continue
            path = _resolve(rel, root)
            _require_file(path, f"data.source.init_args.{split_name}_list")
            parsed[split_name] = (path, *_parse_list_file(path))

        train_path, train_paths, train_labels, _ = parsed["train"]
        if self.class_names_file is not None:
            names_path = _resolve(self.class_names_file, root)
            _require_file(names_path, "data.source.init_args.class_names_file")
            class_names = _parse_class_names(names_path)
        else:
            class_names = None
        if class_names is not None:
            num_classes = len(class_names)
            why = f"{num_classes} classes in {self.class_names_file}"
        else:
            # Without a names file the classes are 0..C-1, the training labels present without a gap:
            # a stray label (a typo like 70 for 7) is then reported where it is written.
            num_classes = _gapless_label_count(train_labels)
            why = (f"no class_names_file: the classes are taken to be 0..{num_classes - 1}, the training labels "
                   "present without a gap; set data.source.init_args.class_names_file if there are more")

        for split_name, (path, _, labels, line_nos) in parsed.items():
            bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
            if bad.size:
                i = int(bad[0])
                more = f"; {bad.size - 1} more such lines" if bad.size > 1 else ""
                raise DataFormatError(
                    f"{path}, line {line_nos[i]}: label {int(labels[i])} is outside [0, {num_classes}) ({why}){more}"
                )

        _check_no_empty_class(train_labels, num_classes, str(train_path), class_names)
        if class_names is None:
            class_names = _names_from_dirs(train_paths, train_labels, num_classes)

        def to_split(split_name: str) -> Split | None:
            if split_name not in parsed:
                return None
            path, rel_paths, labels, line_nos = parsed[split_name]
            return Split([str(root / p) for p in rel_paths], labels, origin=str(path), positions=line_nos)

        return DatasetSplits(
            name=self.name,
            train=to_split("train"),
            val=to_split("val"),
            test=to_split("test"),
            class_names=class_names,
        )


# --------------------------------------------------------------------------------------------
# iNaturalist (COCO-style json)


def _load_coco_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8-sig") as fh:  # -sig: a byte-order mark is not an error
            data = json.load(fh)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, too many digits, nesting
        raise DataFormatError(f"{path}: invalid JSON ({str(exc)[:200]})") from None
    if not isinstance(data, dict):
        raise DataFormatError(f"{path}: expected a JSON object with 'images', 'annotations', 'categories'")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DataFormatError(f"{path}: missing top-level key {key!r}")
        if not isinstance(data[key], list):
            raise DataFormatError(f"{path}: {key!r} must be a list")
    return data


def _get(record: dict, key: str, path: Path, what: str, pos: int):
    try:
        return record[key]
    except (KeyError, TypeError):
        raise DataFormatError(f"{path}: {what}[{pos}] is missing key {key!r}: {str(record)[:200]}") from None


def _get_id(record: dict, key: str, path: Path, what: str, pos: int) -> int | str:
    value = _get(record, key, path, what, pos)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DataFormatError(f"{path}: {what}[{pos}][{key!r}] must be an integer or a string, got {str(value)[:200]}")
    return value


class INatJsonSource(DataSource):
    """iNaturalist 2018 style COCO json (``images``, ``annotations``, ``categories``).

    Category ids may be non-contiguous: the sorted ids of the training json map to 0..C-1.
    iNat's official val set is the benchmark's *test* set, so there is no validation split
    unless ``val_json`` names one: the DataModule then carves a held-out split out of train
    (``data.holdout_per_class``); the test json never doubles as validation.
    """

    def __init__(
        self,
        root: str,
        train_json: str = "train2018.json",
        test_json: str | None = "val2018.json",
        val_json: str | None = None,
        name: str = "inat2018",
    ) -> None:
        self.root = root
        self.train_json = train_json
        self.test_json = test_json
        self.val_json = val_json
        self.name = name

    def _split(self, path: Path, data: dict, id_to_class: dict, root: Path) -> Split:
        file_of = {}
        for pos, img in enumerate(data["images"]):
            file_name = _get(img, "file_name", path, "images", pos)
            if not isinstance(file_name, str) or not file_name:
                raise DataFormatError(f"{path}: images[{pos}]['file_name'] must be a path, got {str(file_name)[:200]}")
            file_of[_get_id(img, "id", path, "images", pos)] = (file_name, pos)
        label_of: dict = {}
        for pos, ann in enumerate(data["annotations"]):
            image_id = _get_id(ann, "image_id", path, "annotations", pos)
            cat = _get_id(ann, "category_id", path, "annotations", pos)
            if image_id not in file_of:
                raise DataFormatError(f"{path}: annotations[{pos}] refers to unknown image_id {image_id!r}")
            if cat not in id_to_class:
                raise DataFormatError(
                    f"{path}: annotations[{pos}] has category_id {cat!r}, which is not a category of {self.train_json}"
                )
            if image_id in label_of:
                raise DataFormatError(f"{path}: image_id {image_id!r} has more than one annotation (annotations[{pos}])")
            label_of[image_id] = id_to_class[cat]
        # Images are kept in the json's order; unlabeled images (e.g. a challenge test set) are skipped.
        items, labels, positions = [], [], []
        for image_id, (file_name, pos) in file_of.items():
            if image_id in label_of:
                items.append(str(root / file_name.lstrip("/")))
                labels.append(label_of[image_id])
                positions.append(pos)
        if not items:
            raise DataFormatError(f"{path}: no annotated images")
        return Split(items, np.asarray(labels, dtype=np.int64), origin=str(path), positions=np.asarray(positions),
                     position_format="images[{}]")

    def load(self) -> DatasetSplits:
        root = Path(os.path.expanduser(self.root))
        _require_dir(root, "data.source.init_args.root")
        train_path = _resolve(self.train_json, root)
        _require_file(train_path, "data.source.init_args.train_json")
        train_data = _load_coco_json(train_path)
        cat_name = {}
        for pos, cat in enumerate(train_data["categories"]):
            cat_name[_get_id(cat, "id", train_path, "categories", pos)] = str(
                _get(cat, "name", train_path, "categories", pos)
            )
        if not cat_name:
            raise DataFormatError(f"{train_path}: 'categories' is empty")
        try:
            sorted_ids = sorted(cat_name)
        except TypeError:
            raise DataFormatError(f"{train_path}: category ids mix integers and strings; use one type") from None
        id_to_class = {cid: i for i, cid in enumerate(sorted_ids)}
        class_names = [cat_name[cid] for cid in sorted_ids]
        train = self._split(train_path, train_data, id_to_class, root)
        _check_no_empty_class(train.labels, len(class_names), str(train_path), class_names)

        def optional(rel: str | None, option: str) -> Split | None:
            if rel is None:
                return None
            path = _resolve(rel, root)
            _require_file(path, option)
            return self._split(path, _load_coco_json(path), id_to_class, root)

        test = optional(self.test_json, "data.source.init_args.test_json")
        val = optional(self.val_json, "data.source.init_args.val_json")
        return DatasetSplits(self.name, train=train, val=val, test=test, class_names=class_names)


# --------------------------------------------------------------------------------------------
# Image folder (CIFAR-10 JPEG archive and the like)


def _safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tar archive into dest, refusing absolute paths and '..' members."""
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            name = member.name
            if os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in Path(name).parts:
                raise DataFormatError(f"{archive}: unsafe member path {name!r} (absolute or containing '..')")
        tar.extractall(dest, filter="data")  # also rejects links escaping dest and device files


def _archive_top_dirs(archive: Path) -> set[str]:
    with tarfile.open(archive) as tar:
        return {Path(m.name).parts[0] for m in tar.getmembers() if Path(m.name).parts and m.name != "."}


def extract_archive_to(archive: Path, root: Path) -> None:
    """Make ``root`` exist by extracting ``archive``.

    If every member lives under one top folder named like root (``train/<class>/...`` with
    root ``.../train``), extract into root's parent; otherwise extract into root itself.
    Extraction goes to a temporary sibling directory that is renamed into place, so a crash
    never leaves a half-filled root and concurrent ranks do not clash.
    """
    if not archive.is_file():
        raise DataFormatError(f"archive {archive} does not exist; set data.source.init_args.archive")
    parent = root.parent
    parent.mkdir(parents=True, exist_ok=True)
    tops = _archive_top_dirs(archive)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.extract-", dir=parent))
    try:
        _safe_extract(archive, tmp)
        src = tmp / root.name if tops == {root.name} else tmp
        try:
            os.rename(src, root)
        except OSError:
            if not root.is_dir():  # someone else winning the race is fine; anything else is not
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("extracted %s to %s", archive, root)


class ImageFolderSource(DataSource):
    """``root/<class>/*.jpg`` folders (classes sorted by directory name).

    Balanced held-out val/test slices (``val_per_class``, ``test_per_class`` images of every
    class) are carved out of the folder first; the rest is then made long-tailed with the
    CIFAR-LT profile when ``imbalance_ratio`` is set (or capped at ``max_per_class``).

    Args:
        root: directory holding one sub-directory per class.
        archive: optional .tar/.tar.gz extracted to root when root does not exist yet.
        imbalance_ratio: n_max / n_min of the long-tailed training set (e.g. 100).
        max_per_class: cap on n_max (or on every class when imbalance_ratio is None).
        val_per_class: images per class held out for validation.
        test_per_class: images per class held out for testing.
        test_root: a separate balanced test folder with the same class sub-directories (e.g. the
            official CIFAR test set), instead of test_per_class.
        seed: seed of the hold-out and long-tail subsampling.
        name: dataset name used in summaries and logs.
    """

    def __init__(
        self,
        root: str,
        archive: str | None = None,
        imbalance_ratio: float | None = None,
        max_per_class: int | None = None,
        val_per_class: int = 0,
        test_per_class: int = 0,
        test_root: str | None = None,
        seed: int = 0,
        name: str = "image_folder",
    ) -> None:
        self.root = root
        self.test_root = test_root
        self.archive = archive
        self.imbalance_ratio = imbalance_ratio
        self.max_per_class = max_per_class
        self.val_per_class = val_per_class
        self.test_per_class = test_per_class
        self.seed = seed
        self.name = name

    def load(self) -> DatasetSplits:
        root = Path(os.path.expanduser(self.root))
        if not root.exists() and self.archive is not None:
            extract_archive_to(Path(os.path.expanduser(self.archive)), root)
        if not root.is_dir():
            raise DataFormatError(
                f"image folder {root} does not exist; set data.source.init_args.root "
                "(or data.source.init_args.archive to a .tar.gz to extract there)"
            )
        full, class_names = _read_class_folders(root)
        if self.test_root is not None and self.test_per_class:
            raise DataFormatError("image folder: set either test_root (an official test folder) or test_per_class, not both")
        train, val, test = _holdout_and_long_tail(
            full, self.val_per_class, self.test_per_class, self.imbalance_ratio, self.max_per_class, self.seed
        )
        _check_no_empty_class(train.labels, len(class_names), full.origin, class_names)
        if self.test_root is not None:
            test_root = Path(os.path.expanduser(self.test_root))
            if not test_root.is_dir():
                raise DataFormatError(f"test folder {test_root} does not exist; fix data.source.init_args.test_root")
            test, test_names = _read_class_folders(test_root)
            if test_names != class_names:
                missing = sorted(set(class_names) ^ set(test_names))
                raise DataFormatError(f"test folder {test_root} has other classes than {root} (differing: {missing[:5]})")
        return DatasetSplits(self.name, train=train, val=val, test=test, class_names=class_names)


def _read_class_folders(root: Path) -> tuple[Split, list[str]]:
    """``root/<class>/<image>`` with classes in sorted directory order."""
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataFormatError(f"image folder {root} has no class sub-directories")
    items, labels = [], []
    for c, d in enumerate(class_dirs):
        files = sorted(str(f) for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DataFormatError(f"class directory {d} (class {c}) contains no images ({', '.join(IMAGE_EXTENSIONS)})")
        items.extend(files)
        labels.extend([c] * len(files))
    return Split(items, np.asarray(labels, dtype=np.int64), origin=str(root)), [d.name for d in class_dirs]


def _holdout_and_long_tail(
    full: Split,
    val_per_class: int,
    test_per_class: int,
    imbalance_ratio: float | None,
    max_per_class: int | None,
    seed: int,
) -> tuple[Split, Split | None, Split | None]:
    """Carve balanced val/test slices first, then long-tail (or cap) what remains."""
    val = test = None
    try:
        val_idx, test_idx, rest = holdout_slices(full.labels, val_per_class, test_per_class, seed)
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
            rest = rest[make_long_tailed(full.labels[rest], imbalance_ratio, seed, max_per_class)]
        elif max_per_class is not None:
            rest = rest[cap_per_class(full.labels[rest], max_per_class, seed)]
    except DataFormatError as exc:
        raise DataFormatError(f"{full.origin}: {exc}") from None
    return full.subset(rest), val, test


# --------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX files)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_at_most(fh, limit: int) -> bytes:
    """Up to ``limit`` bytes, read in chunks: never a buffer of ``limit`` bytes up front."""
    chunks, size = [], 0
    while size < limit and (chunk := fh.read(min(limit - size, 1 << 24))):
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def read_idx(path: str | os.PathLike, expected_ndim: int | None = None) -> np.ndarray:
    """Parse an IDX file (optionally gzip-compressed) with numpy.

    The header is read first and the size it declares checked against the file (a .gz is read
    up to one byte past it), so a corrupt header never makes it read or allocate absurd amounts.
    """
    path = Path(path)
    gz = path.suffix == ".gz"
    try:
        opener = gzip.open if gz else open
        with opener(path, "rb") as fh:
            data = fh.read(4)
            if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
                raise DataFormatError(f"{path}: bad IDX magic number {data[:4].hex() or '(empty)'}, not an IDX file")
            ndim = data[3]
            if expected_ndim is not None and ndim != expected_ndim:
                raise DataFormatError(f"{path}: IDX file has {ndim} dimensions, expected {expected_ndim}")
            header = 4 + 4 * ndim
            data += fh.read(header - 4)
            if len(data) < header:
                raise DataFormatError(f"{path}: truncated IDX header")
            dims = struct.unpack(f">{ndim}I", data[4:header])
            dtype = np.dtype(_IDX_DTYPES[data[2]])
            expected = math.prod(dims) * dtype.itemsize  # Python ints: no int64 wrap-around
            size = os.fstat(fh.fileno()).st_size - header if not gz else None
            if size is None or size == expected:
                payload = _read_at_most(fh, expected + 1)
                size = len(payload)
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError; a cut .gz raises EOFError
        raise DataFormatError(f"{path}: cannot read IDX file ({exc})") from None
    if size != expected:
        has = f"more than {expected}" if gz and size > expected else size
        raise DataFormatError(f"{path}: IDX payload has {has} bytes, dims {dims} need {expected} (truncated file?)")
    try:
        return np.frombuffer(payload, dtype=dtype).reshape(dims)
    except ValueError as exc:  # e.g. (0, 2**32-1, 2**32-1, 2**32-1): no data, but no valid numpy shape either
        raise DataFormatError(f"{path}: IDX dims {dims} are not a valid array shape ({exc})") from None


class FashionMNISTSource(DataSource):
    """Fashion-MNIST from its IDX files, optionally made long-tailed.

    Args:
        root: directory with train-images-idx3-ubyte(.gz) etc.; defaults to $LPT_FASHION_MNIST_DIR
            or /usr/share/datasets/fashion-mnist (Debian package dataset-fashion-mnist).
        imbalance_ratio: n_max / n_min of the long-tailed training set.
        max_per_class: cap on n_max (or on every class when imbalance_ratio is None).
        val_per_class: training images per class held out (balanced) for validation.
        max_test_per_class: cap of the official (balanced) t10k test set per class.
        seed: seed of the hold-out and long-tail subsampling.
    """

    name = "fashion_mnist"

    def __init__(
        self,
        root: str | None = None,
        imbalance_ratio: float | None = None,
        max_per_class: int | None = None,
        val_per_class: int = 0,
        max_test_per_class: int | None = None,
        seed: int = 0,
    ) -> None:
        self.root = root
        self.imbalance_ratio = imbalance_ratio
        self.max_per_class = max_per_class
        self.val_per_class = val_per_class
        self.max_test_per_class = max_test_per_class
        self.seed = seed

    def _root(self) -> Path:
        root = self.root or os.environ.get("LPT_FASHION_MNIST_DIR") or FASHION_MNIST_DEFAULT_DIR
        root = Path(os.path.expanduser(root))
        if not root.is_dir():
            raise DataFormatError(
                f"Fashion-MNIST directory {root} does not exist; set data.source.init_args.root "
                "or the LPT_FASHION_MNIST_DIR environment variable"
            )
        return root

    @staticmethod
    def _file(root: Path, base: str) -> Path:
        for candidate in (root / base, root / f"{base}.gz"):
            if candidate.is_file():
                return candidate
        raise DataFormatError(
            f"Fashion-MNIST file {root / base}(.gz) not found; set data.source.init_args.root "
            "or LPT_FASHION_MNIST_DIR to the directory holding the IDX files"
        )

    def _read_pair(self, root: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
        img_path = self._file(root, f"{prefix}-images-idx3-ubyte")
        lbl_path = self._file(root, f"{prefix}-labels-idx1-ubyte")
        images = read_idx(img_path, expected_ndim=3)
        labels = read_idx(lbl_path, expected_ndim=1)
        if labels.dtype.kind not in "iu":
            raise DataFormatError(f"{lbl_path}: expected integer labels, got {labels.dtype}")
        labels = labels.astype(np.int64)
        if images.dtype != np.uint8:
            raise DataFormatError(f"{img_path}: expected uint8 pixels, got {images.dtype}")
        if 0 in images.shape[1:]:
            raise DataFormatError(f"{img_path}: images of size {images.shape[1]}x{images.shape[2]} are empty")
        if images.shape[0] != labels.shape[0]:
            raise DataFormatError(f"{img_path} has {images.shape[0]} images but {lbl_path} has {labels.shape[0]} labels")
        if labels.size and (labels.min() < 0 or labels.max() >= len(FASHION_MNIST_CLASSES)):
            raise DataFormatError(f"{lbl_path}: labels must be in [0, 10), found {int(labels.min())}..{int(labels.max())}")
        return images, labels

    def load(self) -> DatasetSplits:
        root = self._root()
        train_images, train_labels = self._read_pair(root, "train")
        test_images, test_labels = self._read_pair(root, "t10k")
        if train_images.shape[1:] != test_images.shape[1:]:
            raise DataFormatError(
                f"{self._file(root, 't10k-images-idx3-ubyte')} holds {test_images.shape[1]}x{test_images.shape[2]} "
                f"images, {self._file(root, 'train-images-idx3-ubyte')} {train_images.shape[1]}x{train_images.shape[2]}"
            )
        images = np.concatenate([train_images, test_images])  # items index into this one array
        offset = train_images.shape[0]
        full = Split(list(range(offset)), train_labels, origin=str(root / "train-images-idx3-ubyte"))
        train, val, _ = _holdout_and_long_tail(
            full, self.val_per_class, 0, self.imbalance_ratio, self.max_per_class, self.seed
        )
        _check_no_empty_class(train.labels, len(FASHION_MNIST_CLASSES), full.origin, FASHION_MNIST_CLASSES)
        test_idx = np.arange(test_labels.size)
        if self.max_test_per_class is not None:
            try:
                test_idx = cap_per_class(test_labels, self.max_test_per_class, self.seed)
            except DataFormatError as exc:
                raise DataFormatError(f"{self._file(root, 't10k-labels-idx1-ubyte')}: {exc}") from None
        test = Split(
            [offset + int(i) for i in test_idx], test_labels[test_idx], origin=str(root / "t10k-images-idx3-ubyte")
        )
        return DatasetSplits(
            self.name, train=train, val=val, test=test, class_names=list(FASHION_MNIST_CLASSES), images=images
        )
