"""The LPT++ mixture (SPEC 5): fused confidence p = w p_v + (1 - w) p_l with a learned w(x)."""
from __future__ import annotations

import torch
from torch import nn


def fuse(p_visual: torch.Tensor, p_vl: torch.Tensor, weight: torch.Tensor | float) -> torch.Tensor:
    """w p_v + (1 - w) p_l; ``weight`` is a scalar or one value per sample."""
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:
        weight = weight[:, None]
    return weight * p_visual + (1 - weight) * p_vl


def balanced_accuracy(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Mean per-class accuracy over the classes present in ``labels``."""
    correct = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, (predictions == labels).double())
    total = torch.bincount(labels, minlength=num_classes).double()
    present = total > 0
    return float((correct[present] / total[present]).mean())


def search_base_weight(p_visual: torch.Tensor, p_vl: torch.Tensor, labels: torch.Tensor, step: float = 0.05
                       ) -> tuple[float, dict[float, float]]:
    """Searching-based scorer: the w on the grid {0, step, ..., 1} with the best balanced accuracy
    on held-out data. Ties go to the smallest w (deterministic)."""
    num_classes = p_visual.shape[1]
    n = round(1 / step)
    grid = [round(i * step, 10) for i in range(n + 1)]
    scores = {w: balanced_accuracy(fuse(p_visual, p_vl, w).argmax(1), labels, num_classes) for w in grid}
    best = max(grid, key=lambda w: (scores[w], -w))
    return best, scores


class MoEScorer(nn.Module):
    """Learning-based scorer: w(x) = clamp(W_base + g([q_v; q_l]), 0, 1).

    The last layer of g starts at zero, so training starts exactly at the searched W_base.
    """

    def __init__(self, visual_dim: int, vl_dim: int, hidden_dim: int = 256, dropout: float = 0.0):
        super().__init__()
        self.register_buffer("w_base", torch.tensor(0.5))
        self.offset = nn.Sequential(
            nn.LayerNorm(visual_dim + vl_dim),
            nn.Linear(visual_dim + vl_dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, 1),
        )
        nn.init.zeros_(self.offset[-1].weight)
        nn.init.zeros_(self.offset[-1].bias)

    def forward(self, query_visual: torch.Tensor, query_vl: torch.Tensor) -> torch.Tensor:
        offset = self.offset(torch.cat([query_visual, query_vl], dim=-1).float()).squeeze(-1)
        return (self.w_base + offset).clamp(0.0, 1.0)
