"""Cosine classifier (SPEC 2.3): logits = cos(f, W_c) in [-1, 1]; the scale lives in the loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CosineHead(nn.Module):
    def __init__(self, feature_dim: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        weight = torch.empty(num_classes, feature_dim).uniform_(-1, 1)
        self.weight = nn.Parameter(F.normalize(weight, dim=-1))

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    @torch.no_grad()
    def init_from(self, class_vectors: torch.Tensor) -> None:
        """Start from given class directions (text embeddings or class-mean features)."""
        if class_vectors.shape != self.weight.shape:
            raise ValueError(f"head init: got {tuple(class_vectors.shape)}, expected {tuple(self.weight.shape)}")
        self.weight.copy_(F.normalize(class_vectors.to(self.weight), dim=-1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # float32 under mixed precision too: bf16 keeps 3 significant digits, coarser than the
        # margins the losses put on s * cos (s = 20), and every consumer reads fp32 logits.
        with torch.autocast(device_type=features.device.type, enabled=False):
            return F.normalize(self.dropout(features.float()), dim=-1) @ F.normalize(self.weight.float(), dim=-1).t()
