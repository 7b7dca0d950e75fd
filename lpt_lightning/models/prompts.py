"""Long-tailed prompts (SPEC 2.1): a deep shared prompt and a pool of group prompts with keys."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def append_tokens(tokens: torch.Tensor, *extra: torch.Tensor | None) -> torch.Tensor:
    """[cls; patches] followed by prompt tokens (no positional embedding), batch-expanded."""
    parts = [tokens]
    for e in extra:
        if e is not None:
            parts.append(e.expand(tokens.shape[0], -1, -1) if e.dim() == 2 else e)
    return torch.cat(parts, dim=1) if len(parts) > 1 else tokens


class SharedPrompt(nn.Module):
    """u: [depth, length, dim]; block l sees [tokens; u_l]."""

    def __init__(self, depth: int, length: int, dim: int):
        super().__init__()
        self.prompts = nn.Parameter(torch.empty(depth, length, dim))
        nn.init.trunc_normal_(self.prompts, std=0.02)

    @property
    def length(self) -> int:
        return self.prompts.shape[1]

    def forward(self, block_index: int) -> torch.Tensor:
        return self.prompts[block_index]


@dataclass
class PromptMatch:
    """Result of matching queries against the pool's keys."""

    prompts: torch.Tensor  # [B, depth, length, dim]: the top-k group prompts, averaged
    indices: torch.Tensor  # [B, top_k] selected pool entries
    similarity: torch.Tensor  # [B, pool_size] cosine(q, k_i)


class GroupPromptPool(nn.Module):
    """R: [pool_size, depth, length, dim] and keys [pool_size, key_dim], one parameter each.

    The pool stays one parameter indexed per sample (not a ModuleList of prompts), so every
    rank's DDP graph has the same parameters whatever the selection.
    """

    def __init__(self, pool_size: int, depth: int, length: int, dim: int, key_dim: int, top_k: int = 2):
        super().__init__()
        if not 1 <= top_k <= pool_size:
            raise ValueError(f"group prompts: top_k={top_k} must be in [1, pool_size={pool_size}]")
        self.top_k = top_k
        self.prompts = nn.Parameter(torch.empty(pool_size, depth, length, dim))
        self.keys = nn.Parameter(torch.empty(pool_size, key_dim))
        nn.init.trunc_normal_(self.prompts, std=0.02)
        nn.init.trunc_normal_(self.keys, std=0.02)

    @property
    def depth(self) -> int:
        return self.prompts.shape[1]

    def match(self, query: torch.Tensor) -> PromptMatch:
        similarity = F.normalize(query, dim=-1) @ F.normalize(self.keys, dim=-1).t()
        # top-k indices carry no gradient: keys learn only from the matching loss.
        indices = similarity.topk(self.top_k, dim=-1).indices
        prompts = self.prompts[indices].mean(dim=1)
        return PromptMatch(prompts=prompts, indices=indices, similarity=similarity)
