"""Result reports: metrics.json, per-class tables and plots of accuracy against training count,
to files beside the logs and to Weights & Biases when a WandbLogger is attached."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from lpt_lightning.checkpoints.files import atomic_save
from lpt_lightning.errors import ConfigError
from lpt_lightning.metrics import SPLIT_KEYS, format_split_table, shot_groups



def _finite(x: float) -> float | None:
    return None if x is None or math.isnan(x) else round(float(x), 4)


def write_metrics(path: Path, results: dict[str, dict[str, Any]], class_counts: torch.Tensor,
                  class_names: list[str] | None, convention: str) -> None:
    """JSON with the split accuracies of every evaluated row and the per-class accuracies."""
    payload = {
        "split_convention": convention,
        "class_counts": [int(c) for c in class_counts],
        "class_names": class_names,
        "results": {
            row: {k: _finite(v[k]) for k in SPLIT_KEYS}
            | {"per_class": [_finite(float(x)) for x in v["per_class"]]}
            for row, v in results.items()
        },
    }
    atomic_save(lambda tmp: tmp.write_text(json.dumps(payload, indent=1)), path)


def read_metrics(path: Path) -> dict[str, dict[str, float]]:
    data = json.loads(path.read_text())
    return {row: {k: (float("nan") if v[k] is None else v[k]) for k in SPLIT_KEYS}
            for row, v in data["results"].items()}


def plot_per_class_accuracy(path: Path, results: dict[str, dict[str, Any]], class_counts: torch.Tensor,
                            title: str) -> None:
    """Per-class accuracy against the class's training count (log scale), one series per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [int(c) for c in class_counts]
    fig, ax = plt.subplots(figsize=(7, 4))
    for row, values in results.items():
        acc = [float(x) for x in values["per_class"]]
        ax.scatter(counts, acc, s=14, alpha=0.7, label=f"{row} ({values['acc']:.1f}%)")
    for boundary in (20, 100):
        ax.axvline(boundary, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class")
    ax.set_ylabel("test accuracy of the class (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    atomic_save(lambda tmp: fig.savefig(tmp, dpi=110, format="png"), path)
    plt.close(fig)


def split_table(results: dict[str, dict[str, Any]]) -> str:
    return format_split_table({row: {k: v[k] for k in SPLIT_KEYS} for row, v in results.items()})


def per_class_rows(results: dict[str, dict[str, Any]], class_counts: torch.Tensor, class_names: list[str] | None,
                   convention: str) -> tuple[list[str], list[list[Any]]]:
    """One row per class: index, name, training count, group, then the accuracy of every result row."""
    groups = shot_groups(class_counts, convention)
    group_of = ["many" if groups["many"][c] else "medium" if groups["medium"][c] else "few"
                for c in range(len(class_counts))]
    columns = ["class", "name", "train_count", "group", *[f"acc[{row}]" for row in results]]
    rows = []
    for c, count in enumerate(class_counts.tolist()):
        accs = [_finite(float(v["per_class"][c])) for v in results.values()]
        rows.append([c, class_names[c] if class_names else str(c), int(count), group_of[c], *accs])
    return columns, rows


class SplitReport(Callback):
    """After ``lpt test``: the per-class table (CSV) and the accuracy-versus-training-count plot
    (PNG) beside the logs; with a WandbLogger also a W&B table, the plot and, for phase 3, the
    comparison of each expert, W_base fusion and the full scorer."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def on_test_end(self, trainer, pl_module) -> None:
        results = {k: v for k, v in getattr(pl_module, "results", {}).items() if k.startswith("test")}
        if not (self.enabled and results):
            return
        out_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective: every rank asks
        if not trainer.is_global_zero:
            return
        counts = pl_module.class_counts.cpu()
        columns, rows = per_class_rows(results, counts, pl_module.class_names, pl_module.split_convention)
        table_path, plot_path = out_dir / "per_class_test.csv", out_dir / "per_class_accuracy_test.png"

        def write_table(tmp: Path) -> None:
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows([columns, *rows])

        atomic_save(write_table, table_path)
        plot_per_class_accuracy(plot_path, results, counts, f"{type(pl_module).__name__}: per-class test accuracy")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(key="test/per_class", columns=columns, data=rows)
                logger.log_image(key="test/per_class_accuracy", images=[str(plot_path)])
                summary = [[row, *(_finite(v[k]) for k in SPLIT_KEYS)] for row, v in results.items()]
                logger.log_table(key="test/split_accuracy", columns=["row", "overall", "many", "medium", "few"],
                                 data=summary)


class PhaseWandbLogger(WandbLogger):
    """Lightning's WandbLogger without its ``anonymous=None`` argument, about which every
    ``wandb.init`` of a recent wandb prints a deprecation note."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            del self._wandb_init["anonymous"]


class LoggedSaveConfig(SaveConfigCallback):
    """Saves config.yaml beside the logs (Lightning's behaviour) and sends the resolved config to
    the experiment loggers (W&B shows it as the run's config).

    An existing config.yaml is never replaced silently: a resumed run, ``lpt test`` and the like
    keep it (it describes the run that wrote the checkpoints); a fresh ``lpt fit`` is refused
    unless ``--overwrite=true``."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.save_to_log_dir and not self.already_saved:
            path = Path(trainer.log_dir) / self.config_filename
            exists = trainer.strategy.broadcast(path.is_file() if trainer.is_global_zero else False)
            if exists and not self.config.get("overwrite"):
                if stage == "fit" and not self.config.get("ckpt_path"):
                    raise ConfigError(f"{path} holds the config of an earlier run: write to a new log directory, or "
                                      "pass --overwrite=true to replace it")
                rank_zero_info(f"keeping {path} (the config of the run being resumed or evaluated)")
                self.save_to_log_dir = False  # still sends the config to the loggers
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = self.config.as_dict() if hasattr(self.config, "as_dict") else dict(self.config)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_hyperparams(config)
