"""The evaluation protocol: which split serves training, val and test (a held-out split carved from
train where the dataset has none), and the record of that data every checkpoint carries."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterable

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lpt_lightning.data.long_tail import holdout_upto
from lpt_lightning.data.sources import DatasetSplits, DataSource, Split
from lpt_lightning.errors import ConfigError


class SplitProtocol:
    """The splits of ``source`` as training and evaluation use them; parsed on first use.

    Args (as ``LongTailDataModule``'s of the same names): ``holdout_per_class``,
    ``holdout_max_fraction``, ``holdout_seed`` carve the held-out split; ``val_from_test`` reports
    the test split as val, for monitoring only. The test split never serves as val otherwise.
    """

    def __init__(self, source: DataSource, holdout_per_class: int = 0, holdout_max_fraction: float = 0.2,
                 holdout_seed: int = 0, val_from_test: bool = False) -> None:
        if holdout_per_class < 0:
            raise ConfigError(f"data.holdout_per_class must be >= 0, got {holdout_per_class}")
        if not 0.0 < holdout_max_fraction < 1.0:
            raise ConfigError(f"data.holdout_max_fraction must be in (0, 1), got {holdout_max_fraction}")
        if holdout_per_class and val_from_test:
            raise ConfigError("set either data.holdout_per_class (a held-out split carved from train) or "
                              "data.val_from_test (monitor the test split), not both")
        self.source = source
        self.holdout_per_class = holdout_per_class
        self.holdout_max_fraction = holdout_max_fraction
        self.holdout_seed = holdout_seed
        self.val_from_test = val_from_test
        self.holdout_summary: str | None = None
        self._source_train_counts: np.ndarray | None = None
        self._data_record: dict | None = None
        self._splits: DatasetSplits | None = None
        self._warned_val_from_test = False
        self._warned_test_from_val = False

    @property
    def splits(self) -> DatasetSplits:
        """The parsed source, the held-out split carved (parsed on first access, so that CLI
        argument links work before setup())."""
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

    @property
    def group_class_counts(self) -> torch.Tensor:
        """Training images per class as the dataset defines them, before a held-out split is
        carved: they define the many/medium/few groups, so tables stay comparable with published
        ones (a carved-out image must not move its class into another group)."""
        self.splits  # parsing the source (and carving) sets _source_train_counts
        return torch.from_numpy(self._source_train_counts)

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

    def check_selection(self, callbacks: Iterable[Any]) -> None:
        """Under ``val_from_test``, refuse callbacks that select on val (= test) metrics."""
        if not self.val_is_test:
            return
        from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

        for callback in callbacks:
            monitor = getattr(callback, "monitor", None)
            if isinstance(callback, (ModelCheckpoint, EarlyStopping)) and monitor and monitor.startswith("val"):
                raise ConfigError(
                    f"{type(callback).__name__}(monitor={monitor!r}) would select on the test split "
                    "(data.val_from_test=true reports test as val, for monitoring only): drop the monitor, "
                    "or set data.holdout_per_class to select on a held-out split instead")
