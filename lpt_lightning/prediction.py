"""``lpt predict`` output: top-k classes with names and confidences, as CSV or JSON."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import BasePredictionWriter

from lpt_lightning.checkpoints import atomic_save


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
