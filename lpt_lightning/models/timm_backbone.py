"""The timm backbone: the only module that reaches into timm's ``VisionTransformer``.

Tested with timm 1.0.31: ``tests/test_backbone_fidelity.py`` pins every method here (``embed``,
``run_block`` through ``attention_for_queries`` and ``mlp_branch``, ``pool``) against timm's own
forward of the same weights. It uses one private timm API, ``VisionTransformer._pos_embed``
(class token + position embedding), and the block's submodule names (``norm1``, ``attn.qkv``,
``ls1``, ``drop_path1``, ...); a timm upgrade that changes them fails those tests.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from lpt_lightning.errors import CheckpointError, ConfigError
from lpt_lightning.models.backbone_spec import REFERENCE_BACKBONES, BackboneSpec, hub_lock
from lpt_lightning.models.frozen_vit import FrozenViT, attend, set_layer_norm_eps
from lpt_lightning.safe_load import read_state_dict


def load_matching(model: nn.Module, state_dict: dict[str, torch.Tensor], path: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and state_dict[k].shape != own[k].shape
    ]
    # Heads of classification checkpoints are not part of a feature backbone: tolerate them.
    unexpected = [k for k in unexpected if not k.startswith(("head.", "fc.", "logit_scale"))]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches (e.g. {mismatched[0]})")
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise CheckpointError(
            f"{path}: does not match the configured backbone: {'; '.join(parts)}. "
            "Check backbone.name / backbone.model_kwargs against the file."
        )
    model.load_state_dict(state_dict, strict=False)


class TimmViT(FrozenViT):
    """timm ``VisionTransformer`` (the visual-only expert's backbone)."""

    def __init__(self, spec: BackboneSpec):
        super().__init__()
        import timm
        from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

        name = spec.name or REFERENCE_BACKBONES["timm"]
        use_hub = bool(spec.pretrained) and spec.checkpoint_path is None
        try:
            with hub_lock() if use_hub else contextlib.nullcontext():
                model = timm.create_model(name, pretrained=use_hub, num_classes=0, **spec.model_kwargs)
        except RuntimeError as exc:
            raise ConfigError(f"backbone.name={name!r}: timm cannot build it ({exc})") from exc
        if not isinstance(model, VisionTransformer):
            raise ConfigError(f"backbone.name={name!r} is a {type(model).__name__}, not a timm VisionTransformer")
        if spec.checkpoint_path:
            path = spec.checkpoint_path
            if path.endswith(".npz"):
                try:
                    model.load_pretrained(path)  # original JAX AugReg checkpoints
                except Exception as exc:
                    raise CheckpointError(f"{path}: cannot load as a timm ViT .npz ({exc})") from exc
            else:
                state_dict = checkpoint_filter_fn(read_state_dict(path), model)
                load_matching(model, state_dict, path)
        set_layer_norm_eps(model, spec.layer_norm_eps)
        self.model = model
        self.embed_dim = model.embed_dim
        self.feature_dim = model.embed_dim
        self.num_blocks = len(model.blocks)
        self.img_size = int(model.patch_embed.img_size[0])
        cfg = model.pretrained_cfg or {}
        self._register_normalisation(cfg.get("mean", (0.5, 0.5, 0.5)), cfg.get("std", (0.5, 0.5, 0.5)))
        self.freeze()

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.blocks

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.patch_embed(self.normalise(images))
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        return m.norm_pre(x)

    def mlp_branch(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

    def attention_for_queries(self, block: nn.Module, x: torch.Tensor, keep: int) -> torch.Tensor:
        attn = block.attn
        heads = attend(block.norm1(x), keep, attn.qkv.weight, attn.qkv.bias, attn.num_heads, attn.q_norm, attn.k_norm)
        return block.drop_path1(block.ls1(attn.proj(attn.norm(heads))))

    @property
    def pools_cls_token(self) -> bool:
        return self.model.global_pool == "token" and isinstance(self.model.fc_norm, nn.Identity)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.norm(tokens), pre_logits=True)
