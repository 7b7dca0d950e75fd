"""Long-tailed subsampling and balanced hold-out slices (SPEC section 6).

All functions are pure and seeded, so every DDP rank (each of which parses the dataset
itself) arrives at exactly the same subset.
"""
from __future__ import annotations

import numpy as np

from lpt_lightning.errors import ConfigError, DataFormatError


def long_tail_counts(n_max: int, num_classes: int, imbalance_ratio: float) -> list[int]:
    """Per-class image counts of the exponential CIFAR-LT profile.

    Class i keeps int(n_max * (1/IR)^(i/(C-1))): class 0 keeps n_max, the last class
    n_max/IR. The expression mirrors the reference CIFAR-LT code term by term so that the
    float rounding (and hence the int truncation) is identical.
    """
    if n_max < 1:
        raise ConfigError(f"long_tail_counts: n_max must be >= 1, got {n_max}")
    if num_classes < 1:
        raise ConfigError(f"long_tail_counts: num_classes must be >= 1, got {num_classes}")
    if not imbalance_ratio >= 1.0:
        raise ConfigError(f"imbalance_ratio must be >= 1 (n_max / n_min), got {imbalance_ratio}")
    if num_classes == 1:
        return [int(n_max)]
    factor = 1.0 / imbalance_ratio
    return [int(n_max * factor ** (i / (num_classes - 1.0))) for i in range(num_classes)]


def _class_index_lists(labels: np.ndarray) -> list[np.ndarray]:
    """Indices of each class 0..max(label); every class must occur (labels are contiguous)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise DataFormatError(f"expected a non-empty 1-D label array, got shape {labels.shape}")
    if labels.min() < 0:
        raise DataFormatError(f"labels must be >= 0, found {int(labels.min())}")
    num_classes = int(labels.max()) + 1
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(num_classes + 1))
    per_class = [order[bounds[c]:bounds[c + 1]] for c in range(num_classes)]
    empty = [c for c, idx in enumerate(per_class) if idx.size == 0]
    if empty:
        raise DataFormatError(
            f"classes must be contiguous 0..{num_classes - 1}, but classes {empty[:10]} have no samples"
        )
    return per_class


def class_order(num_classes: int, class_order_seed: int | None) -> np.ndarray:
    """order[i] is the class that receives the i-th largest long-tailed count: class i itself
    (head first, the CIFAR-LT convention) without a seed, else a seeded permutation, so that
    which classes form the head and which the tail is a controlled variable of a study."""
    if class_order_seed is None:
        return np.arange(num_classes)
    return np.random.default_rng(class_order_seed).permutation(num_classes)


def make_long_tailed(
    labels: np.ndarray,
    imbalance_ratio: float,
    seed: int,
    max_per_class: int | None = None,
    class_order_seed: int | None = None,
) -> np.ndarray:
    """Indices (sorted ascending) of a long-tailed subset of a (roughly) balanced set.

    n_max = the smallest class count of the input, capped by max_per_class, so every class
    can supply its quota. Which samples a class keeps is a seeded random subset; which class
    gets which count follows ``class_order(C, class_order_seed)``.
    """
    per_class = _class_index_lists(labels)
    n_max = min(idx.size for idx in per_class)
    if max_per_class is not None:
        if max_per_class < 1:
            raise ConfigError(f"max_per_class must be >= 1, got {max_per_class}")
        n_max = min(n_max, max_per_class)
    ranked = long_tail_counts(n_max, len(per_class), imbalance_ratio)
    counts = [0] * len(per_class)
    for rank, cls in enumerate(class_order(len(per_class), class_order_seed)):
        counts[cls] = ranked[rank]
    if min(counts) < 1:
        raise ConfigError(
            f"imbalance_ratio {imbalance_ratio} with n_max {n_max} leaves a class with 0 images; "
            "lower the imbalance ratio or raise max_per_class"
        )
    rng = np.random.default_rng(seed)
    kept = [rng.choice(idx, size=k, replace=False) for idx, k in zip(per_class, counts)]
    return np.sort(np.concatenate(kept))


def cap_per_class(labels: np.ndarray, max_per_class: int, seed: int) -> np.ndarray:
    """Indices (sorted) keeping a seeded random min(n_c, max_per_class) samples of each class."""
    if max_per_class < 1:
        raise ConfigError(f"max_per_class must be >= 1, got {max_per_class}")
    rng = np.random.default_rng(seed)
    kept = [
        rng.choice(idx, size=min(idx.size, max_per_class), replace=False)
        for idx in _class_index_lists(labels)
    ]
    return np.sort(np.concatenate(kept))


def balanced_holdout(
    labels: np.ndarray, per_class: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split into (held, rest): exactly per_class seeded-random samples of every class are held.

    Both index arrays are sorted and disjoint and together cover all samples.
    """
    labels = np.asarray(labels)
    if per_class < 0:
        raise ConfigError(f"per_class must be >= 0, got {per_class}")
    if per_class == 0:
        return np.empty(0, dtype=np.int64), np.arange(labels.size, dtype=np.int64)
    per_class_idx = _class_index_lists(labels)
    for c, idx in enumerate(per_class_idx):
        if idx.size < per_class:
            raise DataFormatError(
                f"cannot hold out {per_class} samples of class {c}: it has only {idx.size}"
            )
    rng = np.random.default_rng(seed)
    held = np.sort(
        np.concatenate([rng.choice(idx, size=per_class, replace=False) for idx in per_class_idx])
    ).astype(np.int64)
    mask = np.ones(labels.size, dtype=bool)
    mask[held] = False
    return held, np.flatnonzero(mask).astype(np.int64)


def holdout_upto(
    labels: np.ndarray, per_class: int, seed: int, max_fraction: float = 0.2
) -> tuple[np.ndarray, np.ndarray]:
    """Split a training set into (held, rest) for a held-out split carved before training.

    Class c gives min(per_class, floor(max_fraction * n_c)) seeded-random samples: a head class
    gives ``per_class``, a tail class at most that fraction of its images, and a class too small
    to spare one gives none. Both index arrays are sorted and disjoint and together cover all
    samples.
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if per_class < 1:
        raise ConfigError(f"data.holdout_per_class must be >= 1 to carve a held-out split, got {per_class}")
    if not 0.0 < max_fraction < 1.0:
        raise ConfigError(f"data.holdout_max_fraction must be in (0, 1) (every class keeps training images), "
                          f"got {max_fraction}")
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")  # one pass, not one scan per class (iNat: 8,142)
    _, starts = np.unique(labels[order], return_index=True)
    held = []
    for members in np.split(order, starts[1:]):
        take = min(per_class, int(np.floor(max_fraction * members.size)))
        if take > 0:
            held.append(rng.choice(members, size=take, replace=False))
    held_idx = np.sort(np.concatenate(held)).astype(np.int64) if held else np.empty(0, dtype=np.int64)
    mask = np.ones(labels.size, dtype=bool)
    mask[held_idx] = False
    return held_idx, np.flatnonzero(mask).astype(np.int64)


def holdout_slices(
    labels: np.ndarray, val_per_class: int, test_per_class: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(val, test, rest) sorted indices: a balanced val slice (drawn with ``seed``), then a
    balanced test slice of the remainder (``seed + 1``); 0 per class gives an empty slice.

    The one carving rule of the image-folder and Fashion-MNIST sources, importable so that
    anything else (the stand-in pretraining) can hold out exactly the same images.
    """
    labels = np.asarray(labels)
    val, rest = balanced_holdout(labels, val_per_class, seed)
    held, keep = balanced_holdout(labels[rest], test_per_class, seed + 1)
    return val, rest[held], rest[keep]


def target_slices(
    labels: np.ndarray, val_per_class: int, test_per_class: int, pool_per_class: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(val, test, pool, unused) sorted indices: ``holdout_slices``, then a balanced pool of
    ``pool_per_class`` images of every class (``seed + 2``) out of which the long-tailed training
    set is drawn; ``unused`` is never read by the target task, so a stand-in backbone can be
    pretrained on it without seeing any image the task trains or tests on. Without a pool, the
    whole remainder is the pool and nothing is unused."""
    val, test, rest = holdout_slices(labels, val_per_class, test_per_class, seed)
    if pool_per_class is None:
        return val, test, rest, np.empty(0, dtype=np.int64)
    if pool_per_class < 1:
        raise ConfigError(f"train_pool_per_class must be >= 1, got {pool_per_class}")
    pool, unused = balanced_holdout(np.asarray(labels)[rest], pool_per_class, seed + 2)
    return val, test, rest[pool], rest[unused]
