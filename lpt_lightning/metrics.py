"""Many / medium / few-shot split accuracy (SPEC section 1).

Groups are defined by TRAINING counts n_c:
- "lpt" (default, used by the LPT/LPT++ numbers): many n > 100, medium 20 < n <= 100, few n <= 20.
- "oltr" (OLTR/LIFT):                             many n > 100, medium 20 <= n <= 100, few n < 20.
They differ only for classes with exactly 20 training images (few under LPT, medium under OLTR).

All accuracies are PERCENT (0-100), as the papers report them. Group accuracy is
correct / total over the test samples of the group's classes (on a balanced test set this equals
the mean per-class accuracy).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from lpt_lightning.errors import ConfigError

__all__ = ["SHOT_CONVENTIONS", "SHOT_GROUPS", "SPLIT_KEYS", "SplitAccuracy", "format_split_table", "shot_groups"]

SHOT_CONVENTIONS: tuple[str, ...] = ("lpt", "oltr")
SHOT_GROUPS: tuple[str, ...] = ("many", "medium", "few")
# The scalar results of SplitAccuracy.compute(), in the order tables print them.
SPLIT_KEYS: tuple[str, ...] = ("acc", "acc_many", "acc_medium", "acc_few")


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


def _fmt(value) -> str:
    if value is None:
        return "-"
    v = float(value.item() if isinstance(value, Tensor) else value)
    return "n/a" if math.isnan(v) else f"{v:.2f}"


def format_split_table(results: Mapping[str, Mapping[str, object]]) -> str:
    """Render {row name: SplitAccuracy.compute() dict} as an aligned text table (percent, 2 dp)."""
    header = ["", "overall", "many", "medium", "few"]
    keys = ["acc", "acc_many", "acc_medium", "acc_few"]
    rows = [header] + [[str(name)] + [_fmt(res.get(k)) for k in keys] for name, res in results.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for j, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
