"""Fashion-MNIST from its IDX files (``train-images-idx3-ubyte(.gz)`` etc.)."""
from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from lpt_lightning.data.long_tail import cap_per_class
from lpt_lightning.data.sources.base import (
    DatasetSplits,
    DataSource,
    Split,
    check_no_empty_class,
    holdout_and_long_tail,
)
from lpt_lightning.errors import DataFormatError

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_at_most(fh, limit: int) -> bytes:
    """Up to ``limit`` bytes, read in chunks: never a buffer of ``limit`` bytes up front."""
    chunks, size = [], 0
    while size < limit and (chunk := fh.read(min(limit - size, 1 << 24))):
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


# Not torchvision's read_sn3_pascalvincent_tensor: it reads no .gz, checks with bare asserts and reads the whole
# file first (test_fashion_mnist_bad_files, test_huge_declared_size_reads_little, test_corrupt_gzip_stream).
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
        train_pool_per_class: draw the long-tailed training set from a fixed balanced pool of this
            many images per class (carved after val/test); the rest is never read, so a backbone
            can be pretrained on it without seeing the task's images (default: the whole remainder).
        class_order_seed: permute which class gets which long-tailed count (default: class 0 is
            the head, the last class the tail).
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
        train_pool_per_class: int | None = None,
        class_order_seed: int | None = None,
    ) -> None:
        self.root = root
        self.imbalance_ratio = imbalance_ratio
        self.max_per_class = max_per_class
        self.val_per_class = val_per_class
        self.max_test_per_class = max_test_per_class
        self.seed = seed
        self.train_pool_per_class = train_pool_per_class
        self.class_order_seed = class_order_seed

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
        train, val, _ = holdout_and_long_tail(
            full, self.val_per_class, 0, self.imbalance_ratio, self.max_per_class, self.seed,
            self.train_pool_per_class, self.class_order_seed,
        )
        check_no_empty_class(train.labels, len(FASHION_MNIST_CLASSES), full.origin, FASHION_MNIST_CLASSES)
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
