"""``lpt predict``: top-k classes with names and confidences as CSV or JSON, and the models that
predict from an export (a ``.safetensors`` file of `lpt export`) alone."""
from __future__ import annotations

import csv
import json
import os
import textwrap
from pathlib import Path
from typing import Any, TextIO

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from lpt_lightning.checkpoints.experts import expert_from_checkpoint
from lpt_lightning.checkpoints.files import load_checkpoint_file
from lpt_lightning.checkpoints.metadata import check_phase_metadata, read_phase_metadata
from lpt_lightning.errors import CheckpointError
from lpt_lightning.models.expert import view_outputs
from lpt_lightning.precision import check_precision


class PredictionWriter(BasePredictionWriter):
    """Writes one row per image: its path (or split index), then the top-k classes with their
    names and (fused) confidences. The format follows the suffix of ``output`` (.csv or .json);
    under DDP each rank writes ``<output>.rank<r>`` with its own images.

    Rows are written as each batch is predicted, in the loader's order (a folder's images sorted by
    path, a list file's in its order, a split's by index), under a temporary name renamed at the
    end: memory does not grow with the number of images.
    """

    def __init__(self, output: str = "predictions.csv", top_k: int = 5):
        super().__init__(write_interval="batch")
        if Path(output).suffix not in (".csv", ".json"):
            raise ValueError(f"PredictionWriter output={output!r}: use a .csv or .json file name")
        self.output = output
        self.top_k = top_k
        self._file: TextIO | None = None
        self._rows = 0

    def _path(self, trainer) -> Path:
        return Path(self.output if trainer.world_size == 1 else f"{self.output}.rank{trainer.global_rank}")

    def _tmp(self, trainer) -> Path:
        path = self._path(trainer)
        return path.with_name(f".{path.name}.tmp-{os.getpid()}")

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self._items = trainer.datamodule.predict_items()  # what the batches' index values refer to
        self._names = pl_module.class_names
        self._tmp(trainer).parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self._tmp(trainer), "w", newline="")
        self._csv = csv.writer(self._file)
        self._rows = 0

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        num_classes = prediction["probs"].shape[1]
        names = self._names or [str(c) for c in range(num_classes)]
        k = min(self.top_k, num_classes)
        conf, cls = prediction["probs"].float().topk(k, dim=1)
        if self._rows == 0:
            self._start(k)
        for index, c_row, p_row in zip(prediction["index"].tolist(), cls.tolist(), conf.tolist()):
            self._write({"image": str(self._items[index]), "classes": c_row, "names": [names[c] for c in c_row],
                         "confidences": [round(p, 6) for p in p_row]})

    def _start(self, k: int) -> None:
        if Path(self.output).suffix == ".json":
            self._file.write("[")
        else:
            self._csv.writerow(["image", *(f"top{i}_{field}" for i in range(1, k + 1)
                                           for field in ("class", "name", "confidence"))])

    def _write(self, row: dict[str, Any]) -> None:
        if Path(self.output).suffix == ".json":  # as json.dumps(rows, indent=1) lays the list out
            self._file.write(("\n" if self._rows == 0 else ",\n") + textwrap.indent(json.dumps(row, indent=1), " "))
        else:
            line = [row["image"]]
            for c, n, p in zip(row["classes"], row["names"], row["confidences"]):
                line += [c, n, f"{p:.6f}"]
            self._csv.writerow(line)
        self._rows += 1

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        if self._rows == 0:
            self._start(self.top_k)
        if Path(self.output).suffix == ".json":
            self._file.write("\n]" if self._rows else "]")
        self._file.close()
        self._file = None
        os.replace(self._tmp(trainer), self._path(trainer))

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self._file is not None:  # a failed prediction leaves no partial file
            self._file.close()
            self._file = None
            self._tmp(trainer).unlink(missing_ok=True)


class ExportedExpert(L.LightningModule):
    """A phase-1 or phase-2 expert rebuilt from its export for ``lpt predict``: the trained tensors
    and specs come from the file, the frozen backbone from the hub name or local file its spec
    records, so no upstream checkpoint or run directory is needed. Predicts as the phase module
    does: softmax of the logit scale times the cosine logits.

    Args:
        export: the ``.safetensors`` file.
        num_classes: linked from ``data.num_classes``; must match the export's.
        class_names: linked from the data; the export's own names take precedence.
    """

    def __init__(self, export: str, num_classes: int = 0, class_names: list[str] | None = None):
        super().__init__()
        checkpoint = load_checkpoint_file(export)
        meta = read_phase_metadata(checkpoint, export)
        check_phase_metadata(meta, export, "ckpt_path", num_classes=num_classes or None)
        self.phase_name = meta["phase"]
        self.num_classes = meta["num_classes"]
        self.class_names = meta.get("class_names") or class_names
        self.logit_scale = float(meta["logit_scale"])
        self.expert = expert_from_checkpoint(checkpoint, export)

    @property
    def img_size(self) -> int:
        return self.expert.img_size

    def setup(self, stage: str) -> None:
        check_precision(self.trainer.precision)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        logits, _ = view_outputs(self.expert, batch["image"], self.logit_scale)  # test-time views averaged
        return {"index": batch["index"], "probs": torch.softmax(self.logit_scale * logits, dim=-1)}


# The LightningModule that predicts from an export, by the phase its metadata records, and the
# argument taking the export's path (num_classes and class_names are linked from the data).
EXPORT_PREDICTORS: dict[str, tuple[str, str]] = {
    "adapt": ("lpt_lightning.prediction.ExportedExpert", "export"),
    "group_prompt": ("lpt_lightning.prediction.ExportedExpert", "export"),
    "moe_scorer": ("lpt_lightning.phases.MoEScorerPhase", "weights"),  # both experts + the scorer
}


def export_model_config(path: str, meta: dict[str, Any]) -> dict[str, Any]:
    """The ``model`` section (class_path, init_args) that predicts from the export at ``path``."""
    predictor = EXPORT_PREDICTORS.get(meta["phase"])
    if predictor is None:
        raise CheckpointError(f"ckpt_path={path}: `lpt predict` does not take exports of phase '{meta['phase']}'; "
                              "give the .ckpt it was exported from")
    class_path, argument = predictor
    # Classes are the export's: `lpt predict` on unlabelled images has no other source for them.
    return {"class_path": class_path, "init_args": {argument: str(path), "num_classes": int(meta["num_classes"]),
                                                    "class_names": meta.get("class_names")}}
