"""The interface every frozen backbone gives an expert, whatever library built it.

An expert needs more from its backbone than ``forward``: it appends prompt tokens at every block,
runs a parallel adapter beside each block's MLP and branches after block K. A backbone therefore
exposes ``embed`` (normalise + patch/pos embedding), ``run_block`` (one library block, optionally
with a parallel adapter) and ``pool`` (final norm + CLS feature), reusing the library's own
modules and weights for each step; the library-specific parts live in one module per library
(`timm_backbone`, `open_clip_backbone`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def set_layer_norm_eps(model: nn.Module, eps: float | None) -> None:
    if eps is None:
        return
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.eps = eps


class FrozenViT(nn.Module):
    """Common interface of the frozen backbones; never trained, always in eval mode."""

    embed_dim: int  # token width: the prompts' and adapters' dimension
    feature_dim: int  # pooled feature width: the head's and the keys' dimension
    num_blocks: int
    img_size: int

    def _register_normalisation(self, mean, std) -> None:
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FrozenViT":
        # Frozen: dropout / drop-path stay off whatever the LightningModule does.
        return super().train(False)

    def cast_weights(self, dtype: torch.dtype) -> None:
        """Store the frozen weights in half precision, norms excepted: layer norms keep float32
        parameters so they accept both float32 and half inputs under autocast."""
        for module in self.modules():
            if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
                continue
            for name, param in module.named_parameters(recurse=False):
                param.data = param.data.to(dtype)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] or uint8 in [0, 255] (what the data loaders deliver) -> normalised with
        this backbone's mean/std."""
        if images.dtype == torch.uint8:
            images = images.float().div(255)  # what ToTensor computes: bit-identical floats
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    @property
    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] images, uint8 or float in [0,1] -> [B, N, embed_dim] tokens ([cls; patches])."""
        raise NotImplementedError

    def mlp_branch(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run_block(self, index: int, x: torch.Tensor, adapter: nn.Module | None = None,
                  keep: int | None = None) -> torch.Tensor:
        """One transformer block; with an adapter, y = x' + MLP(LN2(x')) + adapter(x') (SPEC 2.2).

        ``keep``: only the first ``keep`` tokens' outputs are wanted (appended prompt tokens are
        dropped after every block, and the last block's CLS token is all the pooled feature
        reads). Every token still serves as attention key and value, but queries, the output
        projection, the MLP and the adapter run on the kept tokens only: the same outputs for
        fewer FLOPs.
        """
        block = self.blocks[index]
        # Attention is always ours (`attend`: F.scaled_dot_product_attention, flash / memory-
        # efficient kernels on GPUs), whatever the library block would pick (timm's fused_attn
        # flag, nn.MultiheadAttention's paths in open_clip).
        keep = x.shape[1] if keep is None else keep
        y = (x if keep == x.shape[1] else x[:, :keep]) + self.attention_for_queries(block, x, keep)
        out = y + self.mlp_branch(block, y)
        return out + adapter(y) if adapter is not None else out

    def attention_for_queries(self, block: nn.Module, x: torch.Tensor, keep: int) -> torch.Tensor:
        """Attention branch output of the first ``keep`` tokens, keys and values from all of ``x``."""
        raise NotImplementedError

    @property
    def pools_cls_token(self) -> bool:
        """Whether ``pool`` reads the CLS token only (then the last block needs no other output)."""
        raise NotImplementedError

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final norm + CLS feature (+ projection for CLIP): [B, N, d] -> [B, feature_dim]."""
        raise NotImplementedError


def attend(h: torch.Tensor, keep: int, weight: torch.Tensor, bias: torch.Tensor | None, num_heads: int,
            q_norm=None, k_norm=None) -> torch.Tensor:
    """Multi-head attention of the first ``keep`` rows of ``h`` over all rows, from a fused
    [3d, d] q/k/v projection (the layout of timm's ``qkv`` and torch's ``in_proj_weight``);
    returns the heads concatenated, before the output projection."""
    b, n, d = h.shape
    head_dim = d // num_heads
    if keep == n:  # every token queries: one fused projection
        q, k, v = F.linear(h, weight, bias).reshape(b, n, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q = F.linear(h[:, :keep], weight[:d], bias[:d] if bias is not None else None)
        kv = F.linear(h, weight[d:], bias[d:] if bias is not None else None)
        q = q.reshape(b, keep, num_heads, head_dim).transpose(1, 2)
        k, v = kv.reshape(b, n, 2, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, keep, d)
