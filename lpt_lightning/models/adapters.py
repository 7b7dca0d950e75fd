"""AdaptFormer-style visual adapters (SPEC 2.2), run parallel to each block's MLP."""
from __future__ import annotations

import torch
from torch import nn


class ParallelAdapter(nn.Module):
    """S * Up(ReLU(Down(x))) with a zero-initialised up projection, so it starts as identity.

    ``learnable_scale`` switches to the LIFT variant: an input LayerNorm and a trainable scale
    initialised at 1.
    """

    def __init__(self, dim: int, bottleneck: int = 8, scale: float = 0.1, dropout: float = 0.1,
                 learnable_scale: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(dim) if learnable_scale else nn.Identity()
        self.down = nn.Linear(dim, bottleneck)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.kaiming_uniform_(self.down.weight, a=5 ** 0.5)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        if learnable_scale:
            self.scale = nn.Parameter(torch.ones(1))
        else:
            self.register_buffer("scale", torch.tensor(float(scale)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(self.dropout(self.act(self.down(self.norm(x)))))
