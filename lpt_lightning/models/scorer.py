"""The LPT++ mixture (SPEC 5): fused confidence p = w p_v + (1 - w) p_l with a learned w(x)."""
from __future__ import annotations

import torch
from torch import nn


def fuse(p_visual: torch.Tensor, p_vl: torch.Tensor, weight: torch.Tensor | float) -> torch.Tensor:
    """w p_v + (1 - w) p_l; ``weight`` is a scalar or one value per sample."""
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:
        weight = weight[:, None]
    return weight * p_visual + (1 - weight) * p_vl


class BaseWeightSearch:
    """Searching-based scorer, accumulated batch by batch (the held-out outputs are never held
    whole): per grid weight w in {0, step, ..., 1}, the per-class hits of the fused prediction."""

    def __init__(self, num_classes: int, step: float = 0.05):
        n = round(1 / step)
        self.grid = [round(i * step, 10) for i in range(n + 1)]
        self.correct = torch.zeros(len(self.grid), num_classes, dtype=torch.float64)
        self.total = torch.zeros(num_classes, dtype=torch.float64)

    def update(self, p_visual: torch.Tensor, p_vl: torch.Tensor, labels: torch.Tensor) -> None:
        labels = labels.cpu()
        for i, w in enumerate(self.grid):
            hits = (fuse(p_visual, p_vl, w).argmax(1).cpu() == labels).double()
            self.correct[i].index_add_(0, labels, hits)
        self.total += torch.bincount(labels, minlength=self.total.numel()).double()

    def result(self) -> tuple[float, dict[float, float]]:
        """The w with the best balanced accuracy (mean per-class accuracy over the classes present);
        ties go to the smallest w (deterministic)."""
        present = self.total > 0
        scores = {w: float((self.correct[i][present] / self.total[present]).mean()) for i, w in enumerate(self.grid)}
        best = max(self.grid, key=lambda w: (scores[w], -w))
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
        # float32 under mixed precision: w(x) weighs two probabilities whose gap decides the label.
        with torch.autocast(device_type=query_visual.device.type, enabled=False):
            offset = self.offset(torch.cat([query_visual.float(), query_vl.float()], dim=-1)).squeeze(-1)
        return (self.w_base + offset).clamp(0.0, 1.0)
