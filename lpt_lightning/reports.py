"""Result reports: metrics.json, per-class tables, plots of accuracy against training count,
reliability diagrams and confusion pictures, to files beside the logs and to Weights & Biases when
a WandbLogger is attached."""
from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from lpt_lightning.checkpoints.files import atomic_save, file_sha256
from lpt_lightning.errors import ConfigError
from lpt_lightning.metrics import (
    ECE_BINS,
    EXTRA_KEYS,
    SPLIT_KEYS,
    WORST_CLASS_KEYS,
    format_metric_table,
    format_split_table,
    shot_groups,
)
from lpt_lightning.taxonomy import TAXONOMY_KEYS, format_taxonomy_table, supercategory_groups
from lpt_lightning.test_priors import TestPriors, imbalance_factors, plot_test_priors, tau_tuning_allowed

# What a metrics.json records of the data and weights behind its rows, so `lpt compare` can refuse
# runs evaluated on other splits: the held-out and test split digests (`Split.digest`), at the top
# level, and each row's checkpoint as `CHECKPOINT_DIGEST_KEY` (`file_digest`).
DIGEST_KEYS: tuple[str, ...] = ("held_out_digest", "test_digest")
CHECKPOINT_DIGEST_KEY = "checkpoint_sha256"


def _finite(x: float) -> float | None:
    return None if x is None or math.isnan(x) else round(float(x), 4)


def file_digest(path: Path) -> str:
    """The first 12 hex digits of the file's sha256 (a checkpoint's identity in metrics.json)."""
    return file_sha256(path)[:12]


def write_metrics(path: Path, results: dict[str, dict[str, Any]], class_counts: torch.Tensor,
                  class_names: list[str] | None, convention: str, digests: dict[str, str | None] | None = None
                  ) -> None:
    """JSON with the metrics of every evaluated row (`SPLIT_KEYS`, `EXTRA_KEYS`, the worst classes,
    the taxonomy levels' accuracies where the data has them, the row's checkpoint digest), the
    per-class accuracies and the reliability bins; ``digests`` (`DIGEST_KEYS`) at the top level."""
    def row(v: dict[str, Any]) -> dict[str, Any]:
        out = {k: _finite(v[k]) for k in (*SPLIT_KEYS, *EXTRA_KEYS) if k in v}
        out |= {k: v[k] for k in (*WORST_CLASS_KEYS, CHECKPOINT_DIGEST_KEY) if k in v}
        out |= {k: {level: _finite(acc) for level, acc in v[k].items()} for k in TAXONOMY_KEYS if k in v}
        out["per_class"] = [_finite(float(x)) for x in v["per_class"]]
        if "test_priors" in v:
            out["test_priors"] = v["test_priors"]
        if "reliability" in v:
            out["reliability"] = {name: [_finite(float(x)) for x in values]
                                  for name, values in zip(("count", "confidence", "accuracy"), v["reliability"])}
        return out

    payload = {
        "split_convention": convention,
        **(digests or {}),
        "class_counts": [int(c) for c in class_counts],
        "class_names": class_names,
        "results": {name: row(v) for name, v in results.items()},
    }
    atomic_save(lambda tmp: tmp.write_text(json.dumps(payload, indent=1)), path)


def read_metrics(path: Path) -> dict[str, dict[str, Any]]:
    """The scalar metrics of each row of a metrics.json (NaN where undefined; files written before
    the `EXTRA_KEYS` lack them), and the taxonomy levels' accuracies where the row has them."""
    data = json.loads(path.read_text())
    return {row: {k: (float("nan") if v[k] is None else v[k]) for k in (*SPLIT_KEYS, *EXTRA_KEYS) if k in v}
            | {k: v[k] for k in (*WORST_CLASS_KEYS, *TAXONOMY_KEYS) if k in v}
            for row, v in data["results"].items()}


def plot_per_class_accuracy(path: Path, results: dict[str, dict[str, Any]], class_counts: torch.Tensor,
                            title: str, supercategories: list[str] | None = None) -> None:
    """Per-class accuracy against the class's training count (log scale), one series per row; with
    ``supercategories`` (one per class), one panel per row and a colour per supercategory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [int(c) for c in class_counts]
    panels = list(results) if supercategories else [None]
    cols = min(len(panels), 3)
    fig, axes = plt.subplots(-(-len(panels) // cols), cols, figsize=(7 if cols == 1 else 4.5 * cols,
                             4 * -(-len(panels) // cols)), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        if panel is None:
            for row, values in results.items():
                acc = [float(x) for x in values["per_class"]]
                ax.scatter(counts, acc, s=14, alpha=0.7, label=f"{row} ({values['acc']:.1f}%)")
            ax.set_title(title)
        else:
            acc = [float(x) for x in results[panel]["per_class"]]
            for i, (name, classes) in enumerate(supercategory_groups(supercategories).items()):
                # tab20's dark shades, then its light ones: iNat 2018 has 14 supercategories, more
                # than the default cycle's 10 colours
                ax.scatter([counts[c] for c in classes], [acc[c] for c in classes], s=14, alpha=0.7, label=name,
                           color=plt.cm.tab20((2 * i + i // 10) % 20))
            ax.set_title(f"{panel} ({results[panel]['acc']:.1f}%)", fontsize=9)
        for boundary in (20, 100):
            ax.axvline(boundary, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap on a short range
        ax.set_xlabel("training images of the class")
        ax.set_ylabel("test accuracy of the class (%)")
        ax.set_ylim(-2, 102)
        if panel is None:
            ax.legend(fontsize=7, loc="lower right")
        else:  # beside the panel: up to 14 supercategories would hide the points
            ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if supercategories:
        fig.suptitle(title)
    fig.tight_layout()
    atomic_save(lambda tmp: fig.savefig(tmp, dpi=110, format="png"), path)
    plt.close(fig)


def supercategories_of(model: Any) -> list[str] | None:
    """The supercategory of each class of a phase's data (None without a taxonomy that has them)."""
    taxonomy = getattr(model, "taxonomy", None)
    return list(taxonomy.supercategories) if taxonomy is not None and taxonomy.supercategories else None


def split_table(results: dict[str, dict[str, Any]], class_names: list[str] | None = None) -> str:
    """The split-accuracy table, then (for rows that have them) the further metrics' and the
    taxonomy levels' tables."""
    table = format_split_table({row: {k: v[k] for k in SPLIT_KEYS} for row, v in results.items()})
    if any("balanced_acc" in v for v in results.values()):
        table += f"\n\nFurther metrics (%, nll in nats; per group in metrics.json)\n{format_metric_table(results, class_names)}"
    if any("taxonomy" in v for v in results.values()):
        table += f"\n\nAccuracy at each taxonomy level (%; per group in metrics.json)\n{format_taxonomy_table(results)}"
    return table


def _slug(row: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", row).strip("_").lower()


def plot_reliability(path: Path, row: str, reliability: torch.Tensor) -> None:
    """Reliability diagram: accuracy per confidence bin against the diagonal, bins' sample shares below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count, conf, acc = (reliability[i].tolist() for i in range(3))
    centers = [100 * (i + 0.5) / ECE_BINS for i in range(ECE_BINS)]
    width = 100 / ECE_BINS
    fig, (ax, share) = plt.subplots(2, 1, figsize=(4.5, 5), sharex=True, height_ratios=(3, 1))
    ax.bar(centers, [0 if math.isnan(a) else a for a in acc], width=width, edgecolor="black", label="accuracy")
    ax.plot([0, 100], [0, 100], color="grey", ls="--", lw=1, label="calibrated")
    ax.scatter([c for c, n in zip(conf, count) if n], [a for a, n in zip(acc, count) if n], s=10, color="red",
               zorder=3, label="mean confidence")
    ax.set_ylabel("accuracy in bin (%)")
    ax.set_ylim(0, 100)
    ax.set_title(row, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    total = max(sum(count), 1)
    share.bar(centers, [100 * n / total for n in count], width=width, color="grey")
    share.set_xlabel("confidence (top-1 probability, %)")
    share.set_ylabel("samples (%)")
    share.set_xlim(0, 100)
    fig.tight_layout()
    atomic_save(lambda tmp: fig.savefig(tmp, dpi=110, format="png"), path)
    plt.close(fig)


def plot_confusion(path: Path, row: str, values: dict[str, Any], class_names: list[str] | None) -> None:
    """The row-normalised confusion matrix (<= 100 classes), else a table of the most confused pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = (lambda c: class_names[c]) if class_names else str
    if "confusion" in values:
        matrix = values["confusion"].double()
        rates = 100 * matrix / matrix.sum(1, keepdim=True).clamp(min=1)
        c = matrix.shape[0]
        size = min(4 + 0.12 * c, 16)
        fig, ax = plt.subplots(figsize=(size, size))
        image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=100)
        fig.colorbar(image, ax=ax, fraction=0.046, label="% of the true class")
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        if c <= 30:
            ticks = list(range(c))
            ax.set_xticks(ticks, [name(i) for i in ticks], rotation=90, fontsize=6)
            ax.set_yticks(ticks, [name(i) for i in ticks], fontsize=6)
    else:
        pairs = values["top_confused"].tolist()
        fig, ax = plt.subplots(figsize=(6, 0.3 * len(pairs) + 1))
        ax.axis("off")
        cells = [[name(t), name(p), str(n)] for t, p, n in pairs] or [["-", "-", "0"]]
        ax.table(cellText=cells, colLabels=["true class", "predicted as", "samples"], loc="center")
    ax.set_title(f"{row}: confusion", fontsize=9)
    fig.tight_layout()
    atomic_save(lambda tmp: fig.savefig(tmp, dpi=110, format="png"), path)
    plt.close(fig)


def write_pictures(out_dir: Path, results: dict[str, dict[str, Any]], class_names: list[str] | None
                   ) -> dict[str, list[tuple[str, Path]]]:
    """A reliability diagram and a confusion picture per row that has them, under
    ``out_dir/reliability`` and ``out_dir/confusion``; {kind: [(row, path)]}."""
    written: dict[str, list[tuple[str, Path]]] = {"reliability": [], "confusion": []}
    for row, values in results.items():
        if "reliability" in values:
            path = out_dir / "reliability" / f"{_slug(row)}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            plot_reliability(path, row, values["reliability"])
            written["reliability"].append((row, path))
        if "confusion" in values or "top_confused" in values:
            path = out_dir / "confusion" / f"{_slug(row)}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            plot_confusion(path, row, values, class_names)
            written["confusion"].append((row, path))
    return written


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
    """After ``lpt test``: the per-class table (CSV), the accuracy-versus-training-count plot and
    each row's reliability diagram and confusion picture (PNG) beside the logs; with a WandbLogger
    also a W&B table, the pictures and, for phase 3, the comparison of each expert, W_base fusion
    and the full scorer.

    Args:
        enabled: write the reports.
        test_priors: also evaluate every row under forward / backward long-tailed test distributions
            of these imbalance factors (true: 2, 5, 10, 25, 50) and the uniform one, without and
            with post-hoc logit adjustment (tau chosen on the val split when it was evaluated in the
            same run: ``lpt test`` evaluates it first): `lpt_lightning.test_priors`. Writes
            ``test_priors.json`` and ``test_priors.png``; each row's ``test_priors`` block goes to
            metrics.json.
    """

    def __init__(self, enabled: bool = True, test_priors: bool | list[float] | None = None):
        self.enabled = enabled
        self.test_priors = imbalance_factors(test_priors)

    def setup(self, trainer, pl_module, stage: str) -> None:
        # The phases build their metrics from it in their own setup. Only `trainer.validate` (the val
        # grid tau is chosen on) and `trainer.test` use the figures: fit's validation does not pay for them.
        if hasattr(pl_module, "test_priors"):
            wanted = self.enabled and self.test_priors and stage in ("validate", "test")
            pl_module.test_priors = (TestPriors(self.test_priors, tau_tuning_allowed(trainer.datamodule))
                                     if wanted else None)

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
        plot_per_class_accuracy(plot_path, results, counts, f"{type(pl_module).__name__}: per-class test accuracy",
                                supercategories_of(pl_module))
        pictures = write_pictures(out_dir, results, pl_module.class_names)
        priors_plot = out_dir / "test_priors.png"
        if plot_test_priors(priors_plot, results, type(pl_module).__name__):
            blocks = {row: v["test_priors"] for row, v in results.items() if "test_priors" in v}
            atomic_save(lambda tmp: tmp.write_text(json.dumps(blocks, indent=1)), out_dir / "test_priors.json")
            pictures["test_priors"] = [("test priors", priors_plot)]
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(key="test/per_class", columns=columns, data=rows)
                logger.log_image(key="test/per_class_accuracy", images=[str(plot_path)])
                for kind, written in pictures.items():
                    if written:
                        logger.log_image(key=f"test/{kind}", images=[str(p) for _, p in written],
                                         caption=[row for row, _ in written])
                summary = [[row, *(_finite(v[k]) for k in SPLIT_KEYS)] for row, v in results.items()]
                logger.log_table(key="test/split_accuracy", columns=["row", "overall", "many", "medium", "few"],
                                 data=summary)
                keys = [k for k in (*EXTRA_KEYS, *WORST_CLASS_KEYS) if all(k in v for v in results.values())]
                if keys:
                    logger.log_table(key="test/metrics", columns=["row", *keys],
                                     data=[[row, *(v[k] if k in WORST_CLASS_KEYS else _finite(v[k]) for k in keys)]
                                           for row, v in results.items()])


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
