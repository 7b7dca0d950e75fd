"""What a phase needs to know about its data, handed to it explicitly: the phase never reads the
DataModule and the DataModule never reads the model.

`connect` is the composition step `lpt` runs after building the model and the data (and code that
builds them in Python runs before ``trainer.fit``): the data gets the model's image size unless
``data.img_size`` is set, and the model gets the data's `DataFacts`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class DataFacts:
    """Attributes:
        group_class_counts: training images per class as the dataset defines them (before a
            held-out split is carved): they define the many/medium/few groups.
        train_class_counts: training images per class that really train: the losses' prior.
        record: digests of the training and held-out splits (`LongTailDataModule.data_record`),
            recorded in checkpoints and compared phase to phase.
        batch_size: training batch size per device (and stream): lr = base_lr * global batch / 256.
        taxonomy: the classes' `lpt_lightning.taxonomy.Taxonomy` (per-level accuracy), or None.
    """

    group_class_counts: torch.Tensor
    train_class_counts: torch.Tensor
    record: dict[str, Any]
    batch_size: int
    taxonomy: Any = None

    @classmethod
    def from_datamodule(cls, datamodule: Any) -> DataFacts:
        """The facts of a `LongTailDataModule` (or any DataModule with the same public API)."""
        return cls(group_class_counts=torch.as_tensor(datamodule.group_class_counts, dtype=torch.long),
                   train_class_counts=torch.as_tensor(datamodule.train_class_counts, dtype=torch.long),
                   record=datamodule.data_record(), batch_size=int(datamodule.batch_size),
                   taxonomy=getattr(datamodule, "taxonomy", None))


def connect(model: Any, datamodule: Any) -> None:
    """Wire a model and its data: image size model -> data (unless the data sets one), facts data ->
    model (for models that take them: every phase)."""
    if getattr(datamodule, "img_size", 0) is None:
        size = getattr(model, "img_size", None)
        if isinstance(size, int) and size > 0:
            datamodule.img_size = size
    if hasattr(model, "attach_data") and hasattr(datamodule, "data_record"):
        model.attach_data(DataFacts.from_datamodule(datamodule))
