"""Many / medium / few-shot split accuracy (SPEC section 1).

Groups are defined by TRAINING counts n_c:
- "lpt" (default, used by the LPT/LPT++ numbers): many n > 100, medium 20 < n <= 100, few n <= 20.
- "oltr" (OLTR/LIFT):                             many n > 100, medium 20 <= n <= 100, few n < 20.
They differ only for classes with exactly 20 training images (few under LPT, medium under OLTR).

All accuracies are PERCENT (0-100), as the papers report them. Group accuracy is
correct / total over the test samples of the group's classes (on a balanced test set this equals
the mean per-class accuracy).

`EvalMetrics` adds, overall and per group, the `METRIC_NAMES` (percent, except `nll` in nats).
Per-class means (`balanced_acc`, `worst_class_acc`, `hmean`, `gmean`, `macro_f1`) run over the
classes with test samples; a group's `top5`, `nll` and `ece` over the test samples of its classes.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lpt_lightning.errors import ConfigError

__all__ = ["EXTRA_KEYS", "HEADLINE_KEYS", "METRIC_NAMES", "SHOT_CONVENTIONS", "SHOT_GROUPS", "SPLIT_KEYS", "WORST_CLASS_KEYS",
           "EvalMetrics", "SplitAccuracy", "format_metric_table", "format_split_table", "row_values", "shot_groups"]

SHOT_CONVENTIONS: tuple[str, ...] = ("lpt", "oltr")
SHOT_GROUPS: tuple[str, ...] = ("many", "medium", "few")
# The scalar results of SplitAccuracy.compute(), in the order tables print them.
SPLIT_KEYS: tuple[str, ...] = ("acc", "acc_many", "acc_medium", "acc_few")
# EvalMetrics' further scalar results: each metric overall, then per group (e.g. `ece_few`).
METRIC_NAMES: tuple[str, ...] = ("top5", "balanced_acc", "worst_class_acc", "hmean", "gmean", "macro_f1", "nll",
                                 "ece")
GROUP_SUFFIXES: tuple[str, ...] = ("", *(f"_{g}" for g in SHOT_GROUPS))
EXTRA_KEYS: tuple[str, ...] = tuple(f"{m}{s}" for m in METRIC_NAMES for s in GROUP_SUFFIXES)
# What a W&B model artifact records of each row (W&B allows 100 metadata keys in all).
HEADLINE_KEYS: tuple[str, ...] = (*SPLIT_KEYS, "top5", "balanced_acc", "worst_class_acc", "nll", "ece")
# The class index of each `worst_class_acc*` value (None where the group has no tested class).
WORST_CLASS_KEYS: tuple[str, ...] = tuple(f"worst_class{s}" for s in GROUP_SUFFIXES)
ECE_BINS = 15
CONFUSION_MATRIX_MAX_CLASSES = 100  # above: the most confused pairs instead of the full matrix
TOP_CONFUSED_PAIRS = 20
# Float sums are kept as int64 fixed point (2^-32 resolution): integer sums do not depend on the
# order of addition, so any split over ranks gives the single-process result bit for bit.
_FIXED = 2.0 ** 32
_MIN_PROB = 1e-12  # NLL of a probability that underflowed to 0 (as the scorer's training loss)


def as_count_vector(values: Tensor | Sequence[float], *, name: str, min_count: int, min_classes: int = 1,
                    hint: str = "") -> Tensor:
    """Per-class counts as a float64 CPU tensor [C]; ConfigError naming the first bad class."""
    try:
        counts = torch.as_tensor(values.detach().cpu() if isinstance(values, Tensor) else values,
                                 dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"{name} must be a 1-D sequence of numbers: {exc}") from exc
    if counts.dim() != 1:
        raise ConfigError(f"{name} must be 1-D (one count per class), got shape {tuple(counts.shape)}")
    if counts.numel() < min_classes:
        raise ConfigError(f"{name} needs at least {min_classes} class(es), got {counts.numel()}")
    bad = (~torch.isfinite(counts)) | (counts < min_count)
    if bad.any():
        c = int(bad.nonzero()[0])
        raise ConfigError(f"{name}[{c}] = {counts[c].item():g}: counts must be finite and >= {min_count} "
                          f"({int(bad.sum())} class(es) invalid){hint}")
    return counts


def shot_groups(train_counts: Tensor | Sequence[int], convention: str = "lpt") -> dict[str, Tensor]:
    """Boolean masks [C] for "many" / "medium" / "few" from training counts (CPU tensors)."""
    conv = str(convention).lower()
    if conv not in SHOT_CONVENTIONS:
        raise ConfigError(f"unknown shot-group convention {convention!r}; valid: {', '.join(SHOT_CONVENTIONS)}")
    n = as_count_vector(train_counts, name="train_counts", min_count=0)
    many = n > 100
    if conv == "lpt":
        few = n <= 20
    else:
        few = n < 20
    medium = ~many & ~few
    return {"many": many, "medium": medium, "few": few}


class SplitAccuracy(Metric):
    """Top-1 accuracy overall, per shot group and per class, in percent.

    States `correct` / `total` are per-class counts (LongTensor [C], summed across processes), so
    the DDP result is exact as long as the eval sampler never duplicates samples; they stay on the
    device until `compute()`. Out-of-range target labels are counted (`invalid`) and refused there.

    `update(preds, target)`: preds is [B, C] scores (argmax taken) or [B] integer labels.
    `compute()` -> dict of tensors: `acc`, `acc_many`, `acc_medium`, `acc_few` (0-dim; NaN when
    the group has no test samples) and `per_class` ([C]; NaN where a class has no test samples).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: Tensor
    total: Tensor
    invalid: Tensor

    def __init__(self, train_counts: Tensor | Sequence[int], convention: str = "lpt", **kwargs) -> None:
        super().__init__(**kwargs)
        groups = shot_groups(train_counts, convention)
        self.convention = str(convention).lower()
        self.num_classes = int(groups["many"].numel())
        for name in SHOT_GROUPS:
            # Plain (non-state) buffers: move with the metric, never reset or synced.
            self.register_buffer(f"mask_{name}", groups[name], persistent=False)
        self.add_state("correct", default=torch.zeros(self.num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(self.num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("invalid", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def group_masks(self) -> dict[str, Tensor]:
        return {name: getattr(self, f"mask_{name}") for name in SHOT_GROUPS}

    def update(self, preds: Tensor, target: Tensor) -> None:
        target = target.reshape(-1).long()
        if preds.dim() == 2:
            if preds.shape[1] != self.num_classes:
                raise ConfigError(f"SplitAccuracy: scores have {preds.shape[1]} classes, expected {self.num_classes}")
            labels = preds.argmax(dim=1)
        elif preds.dim() == 1 and not preds.is_floating_point():
            labels = preds.long()
        else:
            raise ConfigError(
                f"SplitAccuracy: preds must be [B, C] scores or [B] integer labels, got {tuple(preds.shape)} {preds.dtype}"
            )
        if labels.shape != target.shape:
            raise ConfigError(f"SplitAccuracy: {labels.numel()} predictions for {target.numel()} targets")
        # No host sync per batch (bincount reads its input's max on CUDA, a bool() of the range check
        # would wait too): out-of-range labels are counted on the device and refused by compute().
        # scatter_add_ is deterministic on CUDA under torch.use_deterministic_algorithms.
        valid = (target >= 0) & (target < self.num_classes)
        safe = torch.where(valid, target, 0)
        self.total.scatter_add_(0, safe, valid.long())
        self.correct.scatter_add_(0, safe, (valid & (labels == target)).long())
        self.invalid += (~valid).sum()

    @staticmethod
    def _pct(correct: Tensor, total: Tensor) -> Tensor:
        c, t = correct.to(torch.float64), total.to(torch.float64)
        out = 100.0 * c / t.clamp(min=1)
        return torch.where(t > 0, out, torch.full_like(out, float("nan"))).to(torch.float32)

    def compute(self) -> dict[str, Tensor]:
        invalid = int(self.invalid)
        if invalid:
            raise ConfigError(f"SplitAccuracy: {invalid} target label(s) outside [0, {self.num_classes - 1}]: the "
                              "evaluated data has more classes than the model")
        out = {"acc": self._pct(self.correct.sum(), self.total.sum())}
        for name, mask in self.group_masks().items():
            out[f"acc_{name}"] = self._pct(self.correct[mask].sum(), self.total[mask].sum())
        out["per_class"] = self._pct(self.correct, self.total)
        return out


class EvalMetrics(SplitAccuracy):
    """SplitAccuracy plus top-5, the per-class recall means, macro-F1, NLL, ECE, a reliability
    diagram and the confusion counts, from class probabilities.

    Every state is an integer sum (or, for the confusion pairs, a concatenation), so the result
    under DDP is exactly the single-process one; nothing reads the device per batch.

    `update(probs, target)`: probs [B, C] class probabilities (softmax of the scaled logits).
    Top-k counts a sample when fewer than k classes outrank its label, a tie going to the lower
    class index (as argmax does: top-1 is the same count as `acc`). ECE uses `ECE_BINS` equal-width
    bins [i/15, (i+1)/15) of the top-1 probability.
    `compute()` adds to SplitAccuracy's dict: `EXTRA_KEYS` (0-dim float; NaN where undefined),
    `WORST_CLASS_KEYS` (0-dim long, -1 = none), `reliability` [3, ECE_BINS] (samples, mean
    confidence %, accuracy % per bin; NaN for an empty bin) and either `confusion` [C, C] (rows:
    true class) for <= CONFUSION_MATRIX_MAX_CLASSES classes or `top_confused` [K, 3] (true, predicted,
    count) of the most frequent errors.
    """

    correct5: Tensor
    predicted: Tensor
    nll_sum: Tensor
    bin_count: Tensor
    bin_correct: Tensor
    bin_conf: Tensor

    def __init__(self, train_counts: Tensor | Sequence[int], convention: str = "lpt", **kwargs) -> None:
        super().__init__(train_counts, convention, **kwargs)
        c = self.num_classes
        for name, size in (("correct5", c), ("predicted", c), ("nll_sum", c), ("bin_count", c * ECE_BINS),
                           ("bin_correct", c * ECE_BINS), ("bin_conf", c * ECE_BINS)):
            self.add_state(name, default=torch.zeros(size, dtype=torch.long), dist_reduce_fx="sum")
        # true * C + predicted of every sample: the confusion counts, at any number of classes.
        self.add_state("pairs", default=[], dist_reduce_fx="cat")

    def update(self, probs: Tensor, target: Tensor) -> None:
        if probs.dim() != 2 or not probs.is_floating_point():
            raise ConfigError(f"EvalMetrics: probs must be [B, C] class probabilities, got {tuple(probs.shape)} "
                              f"{probs.dtype}")
        super().update(probs, target)
        target = target.reshape(-1).long()
        valid = (target >= 0) & (target < self.num_classes)
        safe = torch.where(valid, target, 0)
        conf, labels = probs.max(dim=1)
        p_true = probs.gather(1, safe[:, None])
        classes = torch.arange(self.num_classes, device=probs.device)
        rank = (probs > p_true).sum(1) + ((probs == p_true) & (classes[None] < safe[:, None])).sum(1)
        hit = valid & (labels == safe)
        self.correct5.scatter_add_(0, safe, (valid & (rank < 5)).long())
        self.predicted.scatter_add_(0, labels, valid.long())
        nll = -p_true.squeeze(1).double().clamp_min(_MIN_PROB).log()
        self.nll_sum.scatter_add_(0, safe, torch.where(valid, _fixed(nll), 0))
        bins = safe * ECE_BINS + (conf.double() * ECE_BINS).floor().long().clamp(0, ECE_BINS - 1)
        self.bin_count.scatter_add_(0, bins, valid.long())
        self.bin_correct.scatter_add_(0, bins, hit.long())
        self.bin_conf.scatter_add_(0, bins, torch.where(valid, _fixed(conf.double()), 0))
        self.pairs.append(safe * self.num_classes + labels)

    def compute(self) -> dict[str, Tensor]:
        out = super().compute()
        total, correct = self.total.double(), self.correct.double()
        tested = self.total > 0
        recall = correct / total.clamp(min=1)
        f1 = 2 * correct / (self.predicted.double() + total).clamp(min=1)  # 2TP / (2TP + FP + FN)
        bins = [t.view(self.num_classes, ECE_BINS).double() for t in (self.bin_count, self.bin_correct, self.bin_conf)]
        bins[2] = bins[2] / _FIXED
        everything = torch.ones_like(tested)
        for suffix, mask in zip(GROUP_SUFFIXES, (everything, *self.group_masks().values())):
            n = self.total[mask].sum().double()
            out[f"top5{suffix}"] = _ratio(100 * self.correct5[mask].sum().double(), n)
            out[f"nll{suffix}"] = _ratio(self.nll_sum[mask].sum().double() / _FIXED, n)
            count, hits, conf = (b[mask].sum(0) for b in bins)
            out[f"ece{suffix}"] = _ratio(100 * (conf - hits).abs().sum(), n)
            cls = mask & tested
            r = recall[cls]
            k = r.numel()
            worst = torch.where(cls, recall, torch.full_like(recall, math.inf)).argmin()
            out[f"worst_class{suffix}"] = worst if k else torch.tensor(-1)
            values = {"balanced_acc": r.mean(), "worst_class_acc": recall[worst],
                      "hmean": k / (1 / r).sum() if bool((r > 0).all()) else r.new_zeros(()),
                      "gmean": r.log().mean().exp(), "macro_f1": f1[cls].mean()}
            for name, value in values.items():
                out[f"{name}{suffix}"] = (100 * value if k else torch.tensor(math.nan, dtype=torch.float64)).float()
        count, hits, conf = (b.sum(0) for b in bins)
        out["reliability"] = torch.stack([count, 100 * conf / count, 100 * hits / count]).float()
        pairs = dim_zero_cat(self.pairs) if len(self.pairs) else self.total.new_zeros(0)
        c = self.num_classes
        if c <= CONFUSION_MATRIX_MAX_CLASSES:
            out["confusion"] = torch.bincount(pairs, minlength=c * c).view(c, c)
        else:
            keys, counts = pairs[pairs // c != pairs % c].unique(return_counts=True)
            top = counts.argsort(descending=True, stable=True)[:TOP_CONFUSED_PAIRS]
            out["top_confused"] = torch.stack([keys[top] // c, keys[top] % c, counts[top]], dim=1)
        return out


def _fixed(x: Tensor) -> Tensor:
    return (x * _FIXED).round().long()


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    return (num / den if den > 0 else torch.tensor(math.nan, dtype=torch.float64)).float()


def row_values(result: Mapping[str, Tensor]) -> dict[str, Any]:
    """An EvalMetrics (or SplitAccuracy) result as a report row: floats, class indices (None for
    none) and CPU tensors (per class, reliability, confusion)."""
    row: dict[str, Any] = {k: float(result[k]) for k in (*SPLIT_KEYS, *EXTRA_KEYS) if k in result}
    row |= {k: (int(result[k]) if int(result[k]) >= 0 else None) for k in WORST_CLASS_KEYS if k in result}
    return row | {k: result[k].cpu() for k in ("per_class", "reliability", "confusion", "top_confused") if k in result}


def log_values(row: Mapping[str, Any]) -> dict[str, float]:
    """The scalars of a report row for Lightning's logger (a missing worst class as NaN)."""
    return {k: math.nan if row[k] is None else float(row[k])
            for k in (*SPLIT_KEYS, *EXTRA_KEYS, *WORST_CLASS_KEYS) if k in row}


def _fmt(value) -> str:
    if value is None:
        return "-"
    v = float(value.item() if isinstance(value, Tensor) else value)
    return "n/a" if math.isnan(v) else f"{v:.2f}"


def format_split_table(results: Mapping[str, Mapping[str, object]]) -> str:
    """Render {row name: SplitAccuracy.compute() dict} as an aligned text table (percent, 2 dp)."""
    header = ["", "overall", "many", "medium", "few"]
    keys = ["acc", "acc_many", "acc_medium", "acc_few"]
    return _render([header] + [[str(name)] + [_fmt(res.get(k)) for k in keys] for name, res in results.items()])


def _render(rows: list[list[str]]) -> str:
    """Aligned columns (first left, others right) with a rule under the header row."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_metric_table(results: Mapping[str, Mapping[str, object]], class_names: Sequence[str] | None = None) -> str:
    """Render the overall `METRIC_NAMES` of each row (e.g. report rows) as an aligned text table;
    the worst class is named after its accuracy. A row without a metric shows "-"."""
    header = ["", *METRIC_NAMES]
    rows = [header]
    for name, res in results.items():
        cells = [str(name)]
        for key in METRIC_NAMES:
            cell = _fmt(res.get(key))
            worst = res.get("worst_class")
            if key == "worst_class_acc" and worst is not None and int(worst) >= 0:
                cell += f" ({class_names[int(worst)] if class_names else int(worst)})"
            cells.append(cell)
        rows.append(cells)
    return _render(rows)
