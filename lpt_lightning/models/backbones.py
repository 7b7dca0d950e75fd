"""Frozen backbones built by expert kind: timm for the visual expert, open_clip for the
vision-language expert, both behind `FrozenViT`.

The names the rest of the package imports from here live in `backbone_spec` (where a backbone
comes from), `frozen_vit` (the interface) and one module per library (`timm_backbone`,
`open_clip_backbone`, the only ones that touch the libraries' internals).
"""
from __future__ import annotations

import torch

from lpt_lightning.errors import ConfigError
from lpt_lightning.models.backbone_spec import REFERENCE_BACKBONES, BackboneSpec
from lpt_lightning.models.frozen_vit import FrozenViT
from lpt_lightning.models.open_clip_backbone import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, OpenClipViT
from lpt_lightning.models.timm_backbone import TimmViT

__all__ = ["BACKBONE_FOR_EXPERT", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "REFERENCE_BACKBONES", "BackboneSpec",
           "FrozenViT", "OpenClipViT", "TimmViT", "build_backbone"]

BACKBONE_FOR_EXPERT = {"visual": TimmViT, "vl": OpenClipViT}


def build_backbone(expert_kind: str, spec: BackboneSpec) -> FrozenViT:
    if expert_kind not in BACKBONE_FOR_EXPERT:
        raise ConfigError(f"expert.kind={expert_kind!r}: choose one of {sorted(BACKBONE_FOR_EXPERT)}")
    # Checkpoints never store the frozen backbone: random initialisations must be reproducible.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.init_seed)
        return BACKBONE_FOR_EXPERT[expert_kind](spec)
