"""``root/<class>/<image>`` folders, optionally extracted from a tar archive (CIFAR-10 JPEG and the like)."""
from __future__ import annotations

import logging
import os
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path

import numpy as np
from torchvision.datasets.folder import find_classes

from lpt_lightning.data.sources.base import (
    IMAGE_EXTENSIONS,
    DatasetSplits,
    DataSource,
    Split,
    check_no_empty_class,
    holdout_and_long_tail,
)
from lpt_lightning.errors import DataFormatError

log = logging.getLogger(__name__)


# Not torchvision's extract_archive: it extracts tars unfiltered, writing '..' members and links out of dest
# (test_image_folder_rejects_unsafe_archive, test_image_folder_rejects_links_out_of_the_archive).
def _extract_tar(archive: Path, dest: Path) -> set[str]:
    """Extract a tar archive (any compression) into dest; return the top-level names of its members.

    Absolute and '..' member paths are refused before anything is written; the "data" filter
    refuses links pointing out of dest and device files."""
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:
                name = member.name
                if os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in Path(name).parts:
                    raise DataFormatError(f"{archive}: unsafe member path {name!r} (absolute or containing '..')")
            tar.extractall(dest, filter="data")
    except tarfile.FilterError as exc:
        raise DataFormatError(f"{archive}: unsafe member ({exc}); the archive is refused") from None
    except (tarfile.TarError, EOFError, zlib.error) as exc:  # a cut .gz raises EOFError
        reason = " ".join(str(exc).split())  # tarfile lists each compression it tried on its own line
        raise DataFormatError(f"{archive}: not a readable tar archive ({reason}); check the file or download it again") from None
    return {Path(m.name).parts[0] for m in members if Path(m.name).parts and m.name != "."}


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
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.extract-", dir=parent))
    try:
        tops = _extract_tar(archive, tmp)
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
        train_pool_per_class: draw the long-tailed training set from a fixed balanced pool of this
            many images per class (carved after val/test); the rest is never read, so a backbone
            can be pretrained on it without seeing the task's images (default: the whole remainder).
        class_order_seed: permute which class gets which long-tailed count (default: class 0 is
            the head, the last class the tail).
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
        train_pool_per_class: int | None = None,
        class_order_seed: int | None = None,
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
        self.train_pool_per_class = train_pool_per_class
        self.class_order_seed = class_order_seed

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
        train, val, test = holdout_and_long_tail(
            full, self.val_per_class, self.test_per_class, self.imbalance_ratio, self.max_per_class, self.seed,
            self.train_pool_per_class, self.class_order_seed,
        )
        check_no_empty_class(train.labels, len(class_names), full.origin, class_names)
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
    """``root/<class>/<image>``: classes in torchvision's sorted directory order, hidden directories
    (``.ipynb_checkpoints``, ``.Trash-1000``) left out; images sorted by name."""
    try:
        class_names = [name for name in find_classes(root)[0] if not name.startswith(".")]
    except FileNotFoundError:  # find_classes' "no class folder"
        class_names = []
    if not class_names:
        raise DataFormatError(f"image folder {root} has no class sub-directories")
    items, labels = [], []
    for c, name in enumerate(class_names):
        d = root / name
        files = sorted(str(f) for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DataFormatError(f"class directory {d} (class {c}) contains no images ({', '.join(IMAGE_EXTENSIONS)})")
        items.extend(files)
        labels.extend([c] * len(files))
    return Split(items, np.asarray(labels, dtype=np.int64), origin=str(root)), class_names
