"""Per-phase result files: metrics.json and a plot of per-class accuracy against training count."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from lpt_lightning.checkpoints import atomic_save
from lpt_lightning.metrics import format_split_table

SPLIT_KEYS = ("acc", "acc_many", "acc_medium", "acc_few")


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
