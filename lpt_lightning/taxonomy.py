"""Accuracy at the levels of a class taxonomy (iNaturalist 2018's ``categories.json``: kingdom,
phylum, class, order, family, genus per species), and the supercategory grouping of per-class plots.

A prediction counts at a level when the predicted class's ancestor at that level is the true
class's. An ancestor is identified by its whole path from the kingdom down (two genera of the
same name in different families are different genera). Accuracies are percent, overall and per
many/medium/few group, from integer counts (exact under DDP, as `EvalMetrics`).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lpt_lightning.errors import DataFormatError
from lpt_lightning.metrics import SHOT_GROUPS, EvalMetrics, _fmt, _render

__all__ = ["TAXONOMY_KEYS", "TAXONOMY_LEVELS", "Taxonomy", "TaxonomyEvalMetrics", "eval_metrics",
           "format_taxonomy_table", "supercategory_groups", "taxonomy_log_values", "taxonomy_values"]

TAXONOMY_LEVELS: tuple[str, ...] = ("kingdom", "phylum", "class", "order", "family", "genus")
# Report-row keys: {level: accuracy} overall, then per shot group.
TAXONOMY_KEYS: tuple[str, ...] = ("taxonomy", *(f"taxonomy_{g}" for g in SHOT_GROUPS))


@dataclass(frozen=True)
class Taxonomy:
    """Attributes:
        levels: the `TAXONOMY_LEVELS` the categories carry, from the top.
        ancestors: per level, the ancestor's name of each class (class order).
        supercategories: each class's ``supercategory`` (None where the file has none).
    """

    levels: tuple[str, ...]
    ancestors: tuple[tuple[str, ...], ...]
    supercategories: tuple[str, ...] | None = None

    @classmethod
    def from_categories(cls, records: Mapping[Any, Mapping[str, Any]], class_ids: Sequence[Any],
                        path: Path) -> Taxonomy | None:
        """The taxonomy of ``class_ids`` from their category records (``{id: record}``); None
        when the records carry no level. A level some classes have and others lack is an error."""
        chosen = [records[cid] for cid in class_ids]

        def column(key: str) -> tuple[str, ...] | None:
            have = [isinstance(r, Mapping) and key in r for r in chosen]
            if not any(have):
                return None
            if not all(have):
                missing = class_ids[have.index(False)]
                raise DataFormatError(f"{path}: category {missing!r} has no {key!r} while others have one: give every "
                                      f"category the whole taxonomy, or none (then no per-level accuracy)")
            return tuple(str(r[key]) for r in chosen)

        levels = [(level, col) for level in TAXONOMY_LEVELS if (col := column(level)) is not None]
        if not levels:
            return None
        return cls(tuple(name for name, _ in levels), tuple(col for _, col in levels), column("supercategory"))

    def as_record(self) -> dict[str, Any]:
        """Plain JSON data (a prepared copy's manifest keeps it: `from_record`)."""
        return {"levels": list(self.levels), "ancestors": [list(a) for a in self.ancestors],
                "supercategories": list(self.supercategories) if self.supercategories is not None else None}

    @classmethod
    def from_record(cls, record: Mapping[str, Any] | None) -> Taxonomy | None:
        if not record:
            return None
        sup = record.get("supercategories")
        return cls(tuple(record["levels"]), tuple(tuple(a) for a in record["ancestors"]),
                   tuple(sup) if sup is not None else None)

    def level_map(self) -> Tensor:
        """LongTensor [L, C]: the index of each class's ancestor at each level (same index = same
        ancestor, by the path from the top level down)."""
        rows = []
        paths = [()] * len(self.ancestors[0])
        for names in self.ancestors:
            paths = [p + (n,) for p, n in zip(paths, names)]
            index = {p: i for i, p in enumerate(sorted(set(paths)))}
            rows.append([index[p] for p in paths])
        return torch.tensor(rows, dtype=torch.long)


class TaxonomyEvalMetrics(EvalMetrics):
    """`EvalMetrics` plus the top-1 accuracy at each taxonomy level: `compute()` adds
    `TAXONOMY_KEYS` entries, each {level: 0-dim percent tensor; NaN where a group has no sample}.

    State: ``level_correct`` [L * C], per level and true class the samples whose predicted class
    has the true class's ancestor (an integer sum)."""

    level_correct: Tensor

    def __init__(self, train_counts: Tensor | Sequence[int], taxonomy: Taxonomy, convention: str = "lpt",
                 **kwargs) -> None:
        super().__init__(train_counts, convention, **kwargs)
        level_map = taxonomy.level_map()
        if level_map.shape[1] != self.num_classes:
            raise DataFormatError(f"the taxonomy has {level_map.shape[1]} classes, the data {self.num_classes}")
        self.levels = taxonomy.levels
        self.register_buffer("level_map", level_map, persistent=False)
        self.add_state("level_correct", default=torch.zeros(len(self.levels) * self.num_classes, dtype=torch.long),
                       dist_reduce_fx="sum")

    def update(self, probs: Tensor, target: Tensor) -> None:
        super().update(probs, target)
        target = target.reshape(-1).long()
        valid = (target >= 0) & (target < self.num_classes)
        safe = torch.where(valid, target, 0)
        same = (self.level_map[:, probs.argmax(dim=1)] == self.level_map[:, safe]) & valid  # [L, B]
        offsets = torch.arange(len(self.levels), device=safe.device)[:, None] * self.num_classes
        self.level_correct.scatter_add_(0, (offsets + safe).reshape(-1), same.reshape(-1).long())

    def compute(self) -> dict[str, Any]:
        out = super().compute()
        correct = self.level_correct.view(len(self.levels), self.num_classes)
        masks = {"taxonomy": torch.ones_like(self.total, dtype=torch.bool)}
        masks |= {f"taxonomy_{g}": m for g, m in self.group_masks().items()}
        for key, mask in masks.items():
            out[key] = {level: self._pct(correct[i][mask].sum(), self.total[mask].sum())
                        for i, level in enumerate(self.levels)}
        return out


def eval_metrics(train_counts: Tensor | Sequence[int], convention: str, taxonomy: Taxonomy | None) -> EvalMetrics:
    """The evaluation metric of a phase: with the per-level accuracies when the data has a taxonomy."""
    if taxonomy is None:
        return EvalMetrics(train_counts, convention=convention)
    return TaxonomyEvalMetrics(train_counts, taxonomy, convention=convention)


def taxonomy_values(result: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """The `TAXONOMY_KEYS` of a metric result as floats (nothing for a result without them)."""
    return {k: {level: float(v) for level, v in result[k].items()} for k in TAXONOMY_KEYS if k in result}


def taxonomy_log_values(row: Mapping[str, Any]) -> dict[str, float]:
    """The taxonomy accuracies of a report row for Lightning's logger: ``taxonomy/genus``,
    ``taxonomy_few/genus``, ... (nothing for a row without them)."""
    return {f"{k}/{level}": acc for k in TAXONOMY_KEYS if k in row for level, acc in row[k].items()}


def format_taxonomy_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """The overall accuracy at each level of the rows that have them, as an aligned text table."""
    rows = {name: v["taxonomy"] for name, v in results.items() if "taxonomy" in v}
    levels = [level for level in TAXONOMY_LEVELS if any(level in r for r in rows.values())]
    return _render([["", *levels], *[[name, *(_fmt(r.get(level)) for level in levels)] for name, r in rows.items()]])


def supercategory_groups(supercategories: Sequence[str]) -> dict[str, list[int]]:
    """{supercategory: its class indices}, supercategories in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for c, name in enumerate(supercategories):
        groups.setdefault(name, []).append(c)
    return groups
