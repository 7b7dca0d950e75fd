"""``lpt predict``: top-k classes with names and confidences as CSV or JSON, and the models that
predict from an export (a ``.safetensors`` file of `lpt export`) alone."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from lpt_lightning.checkpoints.experts import expert_from_checkpoint
from lpt_lightning.checkpoints.files import atomic_save, load_checkpoint_file
from lpt_lightning.checkpoints.metadata import check_phase_metadata, read_phase_metadata
from lpt_lightning.errors import CheckpointError
from lpt_lightning.precision import check_precision


class PredictionWriter(BasePredictionWriter):
    """Writes one row per image: its path (or split index), then the top-k classes with their
    names and (fused) confidences. The format follows the suffix of ``output`` (.csv or .json);
    under DDP each rank writes ``<output>.rank<r>`` with its own images.
    """

    def __init__(self, output: str = "predictions.csv", top_k: int = 5):
        super().__init__(write_interval="batch")
        if Path(output).suffix not in (".csv", ".json"):
            raise ValueError(f"PredictionWriter output={output!r}: use a .csv or .json file name")
        self.output = output
        self.top_k = top_k
        self.rows: list[dict[str, Any]] = []

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self.rows = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        items = self._items(trainer)
        names = pl_module.class_names or [str(c) for c in range(prediction["probs"].shape[1])]
        k = min(self.top_k, prediction["probs"].shape[1])
        conf, cls = prediction["probs"].float().topk(k, dim=1)
        for index, c_row, p_row in zip(prediction["index"].tolist(), cls.tolist(), conf.tolist()):
            self.rows.append({"image": str(items[index]), "classes": c_row, "names": [names[c] for c in c_row],
                              "confidences": [round(p, 6) for p in p_row]})

    @staticmethod
    def _items(trainer) -> list:
        return trainer.datamodule.predict_items()

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        path = Path(self.output if trainer.world_size == 1 else f"{self.output}.rank{trainer.global_rank}")
        rows = sorted(self.rows, key=lambda r: r["image"])
        if Path(self.output).suffix == ".json":
            atomic_save(lambda tmp: tmp.write_text(json.dumps(rows, indent=1)), path)
        else:
            atomic_save(lambda tmp: _write_csv(tmp, rows, self.top_k), path)


def _write_csv(path: Path, rows: list[dict[str, Any]], top_k: int) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        k = len(rows[0]["classes"]) if rows else top_k
        header = ["image"]
        for i in range(1, k + 1):
            header += [f"top{i}_class", f"top{i}_name", f"top{i}_confidence"]
        writer.writerow(header)
        for r in rows:
            line = [r["image"]]
            for c, n, p in zip(r["classes"], r["names"], r["confidences"]):
                line += [c, n, f"{p:.6f}"]
            writer.writerow(line)


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
        logits = self.expert(batch["image"]).logits
        return {"index": batch["index"], "probs": torch.softmax(self.logit_scale * logits.float(), dim=-1)}


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
