"""``lpt compare RUN_DIR [RUN_DIR ...]``: the rows of several runs side by side.

A RUN_DIR is a phase directory or a pipeline run directory (its ``metrics.json`` summary), or a
metrics.json itself. Runs evaluated on other splits are refused (their numbers do not compare)
unless ``--allow-different-test-sets``: the split convention (which classes are many / medium /
few) and the held-out and test split digests that metrics.json records must agree.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lpt_lightning.checkpoints.files import atomic_save
from lpt_lightning.errors import ConfigError
from lpt_lightning.metrics import METRIC_NAMES, SPLIT_KEYS, _fmt, _render
from lpt_lightning.reports import CHECKPOINT_DIGEST_KEY, DIGEST_KEYS, plot_per_class_accuracy
from lpt_lightning.taxonomy import TAXONOMY_LEVELS

# What identifies the test set of a run: runs that differ in one of them are not compared.
TEST_SET_KEYS: tuple[str, ...] = ("split_convention", *DIGEST_KEYS)
METRIC_COLUMNS: tuple[str, ...] = (*SPLIT_KEYS, *METRIC_NAMES)
COLUMNS: tuple[str, ...] = ("run", "row", *METRIC_COLUMNS, *TEST_SET_KEYS, CHECKPOINT_DIGEST_KEY)
# Where rows carry taxonomy levels (`lpt_lightning.taxonomy`), their accuracies follow the metrics.
TAXONOMY_COLUMN = "acc@{}"


@dataclass(frozen=True)
class RunMetrics:
    """One run's metrics.json: ``name`` as given on the command line, ``data`` the parsed file."""

    name: str
    path: Path
    data: dict[str, Any]

    @classmethod
    def read(cls, location: str) -> RunMetrics:
        path = Path(location)
        if path.is_dir():
            path = path / "metrics.json"
        if not path.is_file():
            raise ConfigError(f"{location}: no metrics.json; give a phase directory or a pipeline run directory of "
                              "`lpt pipeline` (or a metrics.json)")
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise ConfigError(f"{path}: invalid JSON ({str(exc)[:200]})") from None
        if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
            raise ConfigError(f"{path}: not a metrics.json of lpt (no 'results' object)")
        return cls(location, path, data)

    def test_set(self, key: str) -> str:
        """The run's `TEST_SET_KEYS` value as text ("not recorded" in a file written before it was)."""
        return str(self.data[key]) if key in self.data else "not recorded"


def check_same_test_sets(runs: list[RunMetrics]) -> None:
    """ConfigError naming the first run whose test set differs from the first run's."""
    first = runs[0]
    for run in runs[1:]:
        for key in TEST_SET_KEYS:
            if key not in first.data or key not in run.data or first.data[key] != run.data[key]:
                raise ConfigError(
                    f"{first.name} and {run.name} may have been evaluated on different test sets: {key} "
                    f"{first.test_set(key)} ({first.path}) vs {run.test_set(key)} ({run.path}); their numbers do not "
                    "compare. Pass --allow-different-test-sets to compare them anyway")


def table(runs: list[RunMetrics]) -> tuple[list[str], list[list[Any]]]:
    """The columns (`COLUMNS`, with ``acc@<level>`` after the metrics for the taxonomy levels any
    row has) and one list per row of every run: values as stored (None where a file has none or
    it is undefined), then the test-set keys and the row's checkpoint digest."""
    results = [(run, name, values) for run in runs for name, values in run.data["results"].items()]
    levels = [level for level in TAXONOMY_LEVELS if any(level in v.get("taxonomy", {}) for _, _, v in results)]
    columns = [*COLUMNS[:2 + len(METRIC_COLUMNS)], *(TAXONOMY_COLUMN.format(level) for level in levels),
               *COLUMNS[2 + len(METRIC_COLUMNS):]]
    rows = [[run.name, name, *(values.get(k) for k in METRIC_COLUMNS),
             *(values.get("taxonomy", {}).get(level) for level in levels),
             *(run.data.get(k) for k in TEST_SET_KEYS), values.get(CHECKPOINT_DIGEST_KEY)]
            for run, name, values in results]
    return columns, rows


def _cells(columns: list[str], row: list[Any]) -> list[str]:
    """Metrics with 2 decimals (percent; nll in nats), "-" where a value is missing."""
    numbers = set(METRIC_COLUMNS) | {c for c in columns if c.startswith(TAXONOMY_COLUMN.format(""))}
    return ["-" if v is None else _fmt(v) if c in numbers else str(v) for v, c in zip(row, columns)]


def format_table(runs: list[RunMetrics]) -> str:
    """The terminal table."""
    columns, rows = table(runs)
    return _render([columns, *[_cells(columns, row) for row in rows]])


def markdown_table(runs: list[RunMetrics]) -> str:
    columns, rows = table(runs)
    header = "| " + " | ".join(columns) + " |"
    rule = "| " + " | ".join("---" if c in COLUMNS and c not in METRIC_COLUMNS else "---:" for c in columns) + " |"
    body = ["| " + " | ".join(cell.replace("|", "\\|") for cell in _cells(columns, row)) + " |" for row in rows]
    return "\n".join([header, rule, *body]) + "\n"


def write_csv(path: Path, runs: list[RunMetrics]) -> None:
    """The table with the values as metrics.json stores them (empty where missing)."""
    columns, rows = table(runs)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows([columns, *[["" if v is None else v for v in row] for row in rows]])

    atomic_save(write, path)


def plot_runs(path: Path, runs: list[RunMetrics]) -> None:
    """Per-class accuracy against training count of every row of every run (`plot_per_class_accuracy`)."""
    counts = runs[0].data.get("class_counts")
    for run in runs[1:]:
        if run.data.get("class_counts") != counts:
            raise ConfigError(f"--plot: {runs[0].name} and {run.name} have other training counts per class; the plot "
                              "puts every row on one axis of training counts, so it needs runs on the same data")
    rows = {f"{run.name}: {name}": {"per_class": [math.nan if x is None else x for x in v["per_class"]],
                                    "acc": math.nan if v.get("acc") is None else v["acc"]}
            for run in runs for name, v in run.data["results"].items() if "per_class" in v}
    if not rows:
        raise ConfigError("--plot: no row of these runs has per-class accuracies")
    plot_per_class_accuracy(path, rows, torch.tensor(counts), "per-class accuracy vs training count")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="lpt compare", allow_abbrev=False,
        description="One table of the rows of several runs (phase or pipeline run directories) with every metric, "
                    "the split convention, the held-out and test split digests and each row's checkpoint digest.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a phase directory, a pipeline run directory or "
                        "a metrics.json")
    parser.add_argument("--markdown", metavar="FILE", help="also write the table as Markdown")
    parser.add_argument("--csv", metavar="FILE",
                        help="also write the table as CSV (values as metrics.json stores them)")
    parser.add_argument("--plot", metavar="FILE", help="also plot per-class accuracy against training count (PNG)")
    parser.add_argument("--allow-different-test-sets", action="store_true",
                        help="compare runs whose split convention or held-out / test split digests differ")
    ns = parser.parse_args(argv)
    runs = [RunMetrics.read(location) for location in ns.runs]
    if not ns.allow_different_test_sets:
        check_same_test_sets(runs)
    print(format_table(runs))
    if ns.markdown:
        atomic_save(lambda tmp: tmp.write_text(markdown_table(runs)), Path(ns.markdown))
    if ns.csv:
        write_csv(Path(ns.csv), runs)
    if ns.plot:
        plot_runs(Path(ns.plot), runs)
