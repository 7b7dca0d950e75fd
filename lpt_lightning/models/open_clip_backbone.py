"""The open_clip backbone: the only module that reaches into open_clip's CLIP model.

Tested with open_clip_torch 3.3.0: ``tests/test_backbone_fidelity.py`` pins every method here
(``embed``, ``run_block`` through ``attention_for_queries`` and ``mlp_branch``, ``pool``,
``encode_text``) against open_clip's own ``encode_image`` / ``encode_text`` of the same weights.
It uses two private open_clip APIs, ``VisionTransformer._embeds`` (patch + class + position
embedding, pre-norm) and ``VisionTransformer._pool`` (the CLS token), and the residual block's
submodule names (``ln_1``, ``attn`` as ``nn.MultiheadAttention``, ``ls_1``, ...); an open_clip
upgrade that changes them fails those tests. Building also resolves the activation the weights
were trained with (QuickGELU for OpenAI's).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Any

import torch
from torch import nn

from lpt_lightning.errors import ConfigError
from lpt_lightning.models.backbone_spec import REFERENCE_BACKBONES, BackboneSpec, hub_lock
from lpt_lightning.models.frozen_vit import FrozenViT, attend, set_layer_norm_eps
from lpt_lightning.safe_load import WEIGHTS_FILE, existing_file, load_errors

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# A weights file read through open_clip's own loader (safely: weights_only) that does not fit the model.
_MISMATCH = ("does not load into the configured open_clip model{name}; check backbone.name / backbone.model_kwargs "
             "against the file")


class OpenClipViT(FrozenViT):
    """open_clip CLIP image tower (the vision-language expert's backbone).

    The pooled feature is the CLIP image embedding (``ln_post`` CLS @ ``proj``), the space the
    text embeddings live in, so the head can start from "a photo of a {class}." embeddings.
    The text tower is kept outside the module tree until ``encode_text`` is done with it.
    """

    def __init__(self, spec: BackboneSpec):
        super().__init__()
        import open_clip

        if spec.model_kwargs:
            model = open_clip.CLIP(**_clip_kwargs_with_activation(spec))
            self._tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model.context_length)
            if spec.checkpoint_path:
                self._load_file(open_clip, model, spec.checkpoint_path)
        else:
            model = _create_open_clip(open_clip, spec)
            self._tokenizer = open_clip.get_tokenizer(spec.name or REFERENCE_BACKBONES["open_clip"])
        set_layer_norm_eps(model, spec.layer_norm_eps)
        visual = model.visual
        self.visual = visual
        # Held in a tuple so the text tower is neither a submodule nor saved in checkpoints.
        self._text_model = (model,)
        self.embed_dim = visual.conv1.out_channels
        self.feature_dim = visual.proj.shape[1] if visual.proj is not None else self.embed_dim
        self.num_blocks = len(visual.transformer.resblocks)
        size = visual.image_size
        self.img_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        cfg = open_clip.get_model_preprocess_cfg(model)
        self._register_normalisation(cfg.get("mean", OPENAI_CLIP_MEAN), cfg.get("std", OPENAI_CLIP_STD))
        if not visual.transformer.batch_first:
            raise ConfigError("open_clip towers with batch_first=False are not supported; upgrade open_clip_torch")
        self.freeze()

    @staticmethod
    def _load_file(open_clip, model: nn.Module, path: str) -> None:
        existing_file(path, WEIGHTS_FILE)
        with load_errors(path, mismatch=_MISMATCH.format(name="")):
            open_clip.load_checkpoint(model, path, strict=True, weights_only=True)

    @torch.no_grad()
    def encode_text(self, prompts: list[str], batch_size: int = 256) -> torch.Tensor:
        """CLIP text embeddings [len(prompts), feature_dim] from the real tokenizer and text tower,
        ``batch_size`` prompts at a time on this module's device (activation memory stays that of
        one batch: 8,142 iNaturalist names in one batch would need ~20 GB, docs/benchmarks.md)."""
        model = self._text_tower()
        device = self.mean.device
        model.to(device).eval()
        out = [model.encode_text(self._tokenizer(prompts[i:i + batch_size]).to(device)).float().cpu()
               for i in range(0, len(prompts), batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.feature_dim)

    def text_digest(self) -> str:
        """Identity of what ``encode_text`` computes: the text tower's weights, dtypes and
        architecture (activation, norms) and the tokenizer's context length."""
        model = self._text_tower()
        h = hashlib.sha256(f"{type(self._tokenizer).__name__}|{model.context_length}|{model!r}".encode())
        for name, tensor in model.state_dict().items():
            if name.startswith("visual."):
                continue
            h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
            h.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy())
        return h.hexdigest()[:32]

    def _text_tower(self) -> nn.Module:
        if not self._text_model:
            raise RuntimeError("the text tower was released; encode class names before release_text_tower()")
        return self._text_model[0]

    def release_text_tower(self) -> None:
        self._text_model = ()

    @property
    def blocks(self) -> nn.ModuleList:
        return self.visual.transformer.resblocks

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual._embeds(self.normalise(images))

    def mlp_branch(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return block.ls_2(block.mlp(block.ln_2(x)))

    def attention_for_queries(self, block: nn.Module, x: torch.Tensor, keep: int) -> torch.Tensor:
        attn = block.attn  # nn.MultiheadAttention (batch_first): fused in_proj, out_proj
        heads = attend(block.ln_1(x), keep, attn.in_proj_weight, attn.in_proj_bias, attn.num_heads)
        return block.ls_1(attn.out_proj(heads))

    @property
    def pools_cls_token(self) -> bool:
        v = self.visual
        return v.attn_pool is None and v.pool_type == "tok"

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.visual._pool(tokens)
        return pooled @ self.visual.proj if self.visual.proj is not None else pooled


def _clip_kwargs_with_activation(spec: BackboneSpec) -> dict[str, Any]:
    """A full ``open_clip.CLIP`` config from ``model_kwargs``: its own ``quick_gelu`` (default
    GELU, as the stand-ins were trained), or ``backbone.quick_gelu`` where it states one."""
    kwargs = dict(spec.model_kwargs)
    own = kwargs.get("quick_gelu")
    if spec.quick_gelu is not None:
        if own is not None and bool(own) != spec.quick_gelu:
            raise ConfigError(
                f"backbone.quick_gelu={spec.quick_gelu} contradicts backbone.model_kwargs.quick_gelu={own}: "
                "give the activation once"
            )
        kwargs["quick_gelu"] = spec.quick_gelu
    return kwargs


def resolve_quick_gelu(open_clip, spec: BackboneSpec, name: str, tag: str | None, weights_file: bool) -> bool:
    """The activation of an open_clip architecture ``name`` (SPEC 2: the published model).

    ``tag``: the pretrained tag the weights come from (hub or local file), or None;
    ``weights_file``: weights are loaded from a local file (so, without a tag, nothing says which
    activation they were trained with).
    """
    arch = bool((open_clip.get_model_config(name) or {}).get("quick_gelu", False))
    if tag is not None:
        tag_value = bool(open_clip.get_pretrained_cfg(name, tag).get("quick_gelu", False))
        if spec.quick_gelu is not None and spec.quick_gelu != tag_value:
            raise ConfigError(
                f"backbone.quick_gelu={spec.quick_gelu} contradicts backbone.pretrained={tag!r}: the {name} "
                f"{tag!r} weights were trained with {'QuickGELU' if tag_value else 'GELU'} "
                f"(open_clip.get_pretrained_cfg). Remove backbone.quick_gelu or set it to {tag_value}."
            )
        return tag_value
    if spec.quick_gelu is not None:
        return spec.quick_gelu
    if weights_file:
        tags = open_clip.list_pretrained_tags_by_model(name)
        quick = [t for t in tags if open_clip.get_pretrained_cfg(name, t).get("quick_gelu", False)]
        plain = [t for t in tags if t not in quick]
        if quick if not arch else plain:  # some published weights differ from the architecture's default
            raise ConfigError(
                f"backbone.checkpoint_path={spec.checkpoint_path!r} with backbone.name={name!r} and no pretrained "
                f"tag: the activation cannot be told from the file ({name} weights such as {quick[:3]} use "
                f"QuickGELU, {plain[:3]} GELU). Set backbone.pretrained to the file's tag (e.g. 'openai') or state "
                "backbone.quick_gelu: true|false."
            )
    return arch


def _create_open_clip(open_clip, spec: BackboneSpec) -> nn.Module:
    """``open_clip.create_model`` for a named architecture: hub weights by tag, or a local file
    through the same call (``pretrained=<file>``: the loader hub weights take), with the
    activation the weights were trained with."""
    name = spec.name or REFERENCE_BACKBONES["open_clip"]
    if open_clip.get_model_config(name) is None:
        raise ConfigError(f"backbone.name={name!r} is not an open_clip architecture (open_clip.list_models())")
    tag = spec.pretrained if isinstance(spec.pretrained, str) and spec.pretrained else None
    path = spec.checkpoint_path
    if spec.pretrained is True and not path:
        tag = "openai"  # hub default; a local file gets a tag only when one is named
    if tag is not None and not open_clip.get_pretrained_cfg(name, tag):
        if not path and os.path.isfile(tag):
            tag, path = None, tag  # open_clip's own pretrained=<file> form
        else:
            raise ConfigError(
                f"backbone.pretrained={tag!r} is not a pretrained tag of {name}: choose one of "
                f"{open_clip.list_pretrained_tags_by_model(name)}"
            )
    quick_gelu = resolve_quick_gelu(open_clip, spec, name, tag, weights_file=bool(path))
    kwargs: dict[str, Any] = {"force_quick_gelu": quick_gelu}
    if not quick_gelu and (open_clip.get_model_config(name) or {}).get("quick_gelu", False):
        kwargs["quick_gelu"] = False  # force_quick_gelu can only switch it on
    if not path:
        try:
            with hub_lock() if tag is not None else contextlib.nullcontext():
                return open_clip.create_model(name, pretrained=tag, **kwargs)
        except RuntimeError as exc:
            raise ConfigError(f"backbone.name={name!r} pretrained={tag!r}: {exc}") from exc
    existing_file(path, WEIGHTS_FILE)
    if tag is not None:
        # The tag's preprocessing (mean/std) as on the hub path.
        cfg = open_clip.get_pretrained_cfg(name, tag)
        kwargs["force_preprocess_cfg"] = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}
    with load_errors(path, mismatch=_MISMATCH.format(name=f" {name}")):
        return open_clip.create_model(name, pretrained=path, weights_only=True, **kwargs)
