"""A long-tailed expert: frozen ViT + shared prompt + adapters + group prompts + cosine head.

Prompt insertion and prefix reuse live in ``LongTailExpert.run_blocks`` / ``forward``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lpt_lightning.errors import ConfigError
from lpt_lightning.models.adapters import ParallelAdapter
from lpt_lightning.models.backbones import BackboneSpec, FrozenViT, build_backbone
from lpt_lightning.models.heads import CosineHead
from lpt_lightning.models.prompts import GroupPromptPool, PromptMatch, SharedPrompt, append_tokens
from lpt_lightning.models.text_cache import cached_text_embeddings


@dataclass
class ExpertSpec:
    """One expert's architecture (SPEC 2). Defaults are the reference constants.

    Attributes:
        kind: ``visual`` (timm ViT, ImageNet-21k) or ``vl`` (open_clip CLIP image tower).
        backbone: where the frozen backbone's weights come from.
        prompt_length: shared prompt tokens per block (Lp).
        adapters: AdaptFormer adapters beside each MLP (False = plain LPT).
        adapter_bottleneck: adapter width r.
        adapter_scale: fixed adapter scale S.
        adapter_learnable_scale: LIFT variant (input LayerNorm, learnable scale init 1).
        adapter_dropout: dropout inside the adapter bottleneck.
        head_dropout: dropout on the feature before the cosine head (training only).
        head_init: ``auto`` = text embeddings for ``vl``, random unit vectors for ``visual``;
            ``class_mean`` = mean training feature of each class.
        text_template: prompt for the text-embedding head init.
        backbone_dtype: keep the frozen backbone's weights in ``bfloat16``/``float16`` to save
            memory (needs a ``*-mixed`` trainer precision); trained tensors stay float32.
        activation_checkpointing: recompute block activations in the backward pass instead of
            storing them (memory for large batches, about one extra forward of compute).
    """

    kind: Literal["visual", "vl"] = "visual"
    backbone: BackboneSpec = field(default_factory=BackboneSpec)
    prompt_length: int = 10
    adapters: bool = True
    adapter_bottleneck: int = 8
    adapter_scale: float = 0.1
    adapter_learnable_scale: bool = False
    adapter_dropout: float = 0.1
    head_dropout: float = 0.1
    head_init: Literal["auto", "random", "text", "class_mean"] = "auto"
    text_template: str = "a photo of a {}."
    backbone_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    activation_checkpointing: bool = False


@dataclass
class GroupPromptSpec:
    """Group prompt pool (SPEC 2.1): blocks 1..start_block see only the shared prompt."""

    pool_size: int = 20
    top_k: int = 2
    start_block: int = 6
    length: int = 10


@dataclass
class ExpertOutput:
    logits: torch.Tensor  # [B, C] cosine logits
    features: torch.Tensor  # [B, feature_dim] what the head read
    query: torch.Tensor  # [B, feature_dim] phase-1 feature q(x) (== features without group prompts)
    match: PromptMatch | None = None


def class_name_to_text(name: str, template: str) -> str:
    # "apartment_building/outdoor", "T-shirt/top": separators become spaces.
    for sep in "_-/":
        name = name.replace(sep, " ")
    return template.format(" ".join(name.split()))


def placeholder_names(names: list[str]) -> bool:
    """True when the class names are numbers (ids standing in for names, as in iNaturalist
    2018's ``train2018.json``): text embeddings of them carry no class meaning."""
    return bool(names) and all(str(n).strip().lstrip("-").isdigit() for n in names)


class LongTailExpert(nn.Module):
    def __init__(self, spec: ExpertSpec, num_classes: int, group: GroupPromptSpec | None = None,
                 backbone: FrozenViT | None = None):
        super().__init__()
        self.spec = spec
        self.backbone = backbone if backbone is not None else build_backbone(spec.kind, spec.backbone)
        if spec.backbone_dtype != "float32":
            self.backbone.cast_weights(getattr(torch, spec.backbone_dtype))
        bb = self.backbone
        self.shared_prompt = SharedPrompt(bb.num_blocks, spec.prompt_length, bb.embed_dim) if spec.prompt_length > 0 else None
        self.adapters = (
            nn.ModuleList(
                ParallelAdapter(bb.embed_dim, spec.adapter_bottleneck, spec.adapter_scale, spec.adapter_dropout,
                                spec.adapter_learnable_scale)
                for _ in range(bb.num_blocks)
            )
            if spec.adapters
            else None
        )
        self.head = CosineHead(bb.feature_dim, num_classes, spec.head_dropout)
        self.group_prompts: GroupPromptPool | None = None
        self.group_start = bb.num_blocks
        if group is not None:
            self.add_group_prompts(group)

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @property
    def img_size(self) -> int:
        return self.backbone.img_size

    def add_group_prompts(self, group: GroupPromptSpec) -> None:
        depth = self.backbone.num_blocks
        if not 0 <= group.start_block < depth:
            raise ConfigError(f"group_prompts.start_block={group.start_block} must be in [0, {depth}) for this backbone")
        self.group_start = group.start_block
        self.group_prompts = GroupPromptPool(group.pool_size, depth - group.start_block, group.length,
                                             self.backbone.embed_dim, self.backbone.feature_dim, group.top_k)

    def init_head_from_text(self, class_names: list[str]) -> None:
        """Head = CLIP text embeddings of "a photo of a {class}." (VL expert, SPEC 2)."""
        if not hasattr(self.backbone, "encode_text"):
            raise ConfigError("expert.head_init='text' needs the vl expert (an open_clip backbone with a text tower)")
        if placeholder_names(class_names):
            raise ConfigError(
                f"the class names are numbers ({', '.join(map(repr, class_names[:3]))}, ...), not names: the vl "
                "expert's head starts from their CLIP text embeddings (expert.head_init='text'). Give the real names: "
                "for iNaturalist 2018 set data.source.init_args.names_json=categories.json (the species names "
                "published beside train2018.json); for a list-file dataset set data.source.init_args.class_names_file. "
                "Or set expert.head_init=class_mean (or random) to start the head without text")
        prompts = [class_name_to_text(n, self.spec.text_template) for n in class_names]
        self.head.init_from(cached_text_embeddings(self.backbone, prompts))

    def release_text_tower(self) -> None:
        """Free the vl backbone's text tower once the head no longer needs it (its text
        initialisation is done, or the head comes from a checkpoint); other backbones have none."""
        release = getattr(self.backbone, "release_text_tower", None)
        if release is not None:
            release()

    def run_blocks(self, x: torch.Tensor, start: int, end: int, group_prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Blocks start..end-1; block l sees [tokens; u_l] (+ r_l from the group pool after K).

        Prompt tokens are appended after [cls; patches] without positional embedding and their
        outputs are dropped after each block (deep prompting).
        """
        recompute = self.spec.activation_checkpointing and self.training and torch.is_grad_enabled()
        last = self.backbone.num_blocks - 1
        for i in range(start, end):
            group = group_prompts[:, i - self.group_start] if group_prompts is not None else None
            # The pooled feature reads the CLS token only: the last block computes just that row.
            keep = 1 if i == last and self.backbone.pools_cls_token else x.shape[1]
            if recompute:
                x = checkpoint(self._prompted_block, i, x, group, keep, use_reentrant=False)
            else:
                x = self._prompted_block(i, x, group, keep)
        return x

    def _prompted_block(self, i: int, x: torch.Tensor, group: torch.Tensor | None, keep: int) -> torch.Tensor:
        shared = self.shared_prompt(i) if self.shared_prompt is not None else None
        adapter = self.adapters[i] if self.adapters is not None else None
        return self.backbone.run_block(i, append_tokens(x, shared, group), adapter, keep=keep)

    def _query_needs_grad(self) -> bool:
        modules = [m for m in (self.shared_prompt, self.adapters) if m is not None]
        return torch.is_grad_enabled() and any(p.requires_grad for m in modules for p in m.parameters())

    def forward(self, images: torch.Tensor, use_group_prompts: bool = True) -> ExpertOutput:
        bb = self.backbone
        x = bb.embed(images)
        if self.group_prompts is None or not use_group_prompts:
            features = bb.pool(self.run_blocks(x, 0, bb.num_blocks))
            return ExpertOutput(logits=self.head(features), features=features, query=features)
        # Prefix reuse (SPEC 2.1): blocks 1..K are identical for the query and the classification
        # pass, so run them once and branch: 1.5 instead of 2 backbone passes.
        x = self.run_blocks(x, 0, self.group_start)
        with torch.set_grad_enabled(self._query_needs_grad()):
            query = bb.pool(self.run_blocks(x, self.group_start, bb.num_blocks))
        match = self.group_prompts.match(query.detach())
        features = bb.pool(self.run_blocks(x, self.group_start, bb.num_blocks, match.prompts))
        return ExpertOutput(logits=self.head(features), features=features, query=query, match=match)


def view_outputs(expert: nn.Module, images: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, query) in float32 of an expert on images [B, 3, S, S], or on the test-time views of
    each image, [B, V, 3, S, S] (`lpt_lightning.data.TestTimeSpec`): then the probabilities
    softmax(scale * logits) are averaged over the views and returned as logits whose softmax they
    are, log(p) / scale, and the query is the mean over the views."""
    if images.dim() == 4:
        out = expert(images)
        return out.logits.float(), out.query.float()
    batch, views = images.shape[:2]
    out = expert(images.flatten(0, 1))
    probs = torch.softmax(scale * out.logits.float(), dim=-1).view(batch, views, -1).mean(1)
    logits = probs.clamp_min(torch.finfo(torch.float32).tiny).log() / scale
    return logits, out.query.float().view(batch, views, -1).mean(1)
