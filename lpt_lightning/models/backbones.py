"""Frozen pretrained ViT backbones behind one interface.

An expert needs more from its backbone than ``forward``: it appends prompt tokens at every block,
runs a parallel adapter beside each block's MLP and branches after block K. Both wrappers
therefore expose ``embed`` (normalise + patch/pos embedding), ``run_block`` (one library block,
optionally with a parallel adapter) and ``pool`` (final norm + CLS feature), and reuse the
library's own modules and weights for each step.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lpt_lightning.errors import CheckpointError, ConfigError
from lpt_lightning.models.text_cache import cache_dir, node_lock

log = logging.getLogger(__name__)

REFERENCE_BACKBONES = {
    # SPEC 2: the visual expert uses the ImageNet-21k-only AugReg weights, NOT in21k-ft-in1k.
    "timm": "vit_base_patch16_224.augreg_in21k",
    "open_clip": "ViT-B-16",
}
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class BackboneSpec:
    """Where a frozen backbone comes from.

    The library follows the expert: ``timm`` for the visual-only expert, ``open_clip`` for the
    vision-language expert.

    Attributes:
        name: timm model name or open_clip architecture; None = the reference model of SPEC 2.
        pretrained: hub weights: ``True``/``False`` for timm, a tag such as ``openai`` for
            open_clip (``None``/``""`` = random init; ``True`` = ``openai`` on the hub). With an
            open_clip ``checkpoint_path``, a tag names the weights the file holds (their activation).
        checkpoint_path: local weights file used instead of the hub (offline clusters): timm state
            dict (.pth/.bin/.safetensors) or original .npz; open_clip checkpoint.
        model_kwargs: architecture overrides passed to ``timm.create_model`` (e.g. a tiny
            ``depth``/``embed_dim`` for tests) or, for open_clip, a full ``open_clip.CLIP``
            config (``embed_dim``, ``vision_cfg``, ``text_cfg``) that replaces ``name``.
        init_seed: seed of the random initialisation when no weights are loaded, so a
            random-weight backbone (tests, demos) is rebuilt identically in every phase and rank.
        layer_norm_eps: epsilon of every LayerNorm of the library model; None = the model's own.
            Models trained on a rebuilt backbone may differ here (the official LPT code builds
            timm's ViT with ``nn.LayerNorm``, eps 1e-5, where timm's pretrained ViTs use 1e-6).
        quick_gelu: open_clip only: whether the towers use QuickGELU (``x * sigmoid(1.702 x)``,
            what OpenAI CLIP was trained with) instead of GELU. None = resolved: a pretrained
            tag (hub or local file alike) decides it from ``open_clip.get_pretrained_cfg``; a
            local file without a tag must state it when the architecture's published weights
            differ (ViT-B-16: ``openai`` QuickGELU, ``laion2b_*`` GELU). A value that contradicts
            the tag (or ``model_kwargs["quick_gelu"]``) is refused.
    """

    name: str | None = None
    pretrained: bool | str | None = True
    checkpoint_path: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    init_seed: int = 0
    layer_norm_eps: float | None = None
    quick_gelu: bool | None = None


def hub_lock():
    """Hub downloads one process at a time per node (a lock file in ``$LPT_CACHE_DIR``): the first
    downloads into the hub's cache, the ranks after it wait and read the files from there instead of
    fetching (and writing) them at once. Under Lightning's launcher rank 0 builds the model before
    it starts the other ranks; under ``srun`` or ``torchrun`` they start together and this orders them."""
    return node_lock(cache_dir(), "hub-download.lock", "hub downloads (ranks may download at once)")


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
        # Attention is always ours (`_attend`: F.scaled_dot_product_attention, flash / memory-
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


def _attend(h: torch.Tensor, keep: int, weight: torch.Tensor, bias: torch.Tensor | None, num_heads: int,
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


def _unwrap_state_dict(obj: Any, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "module"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors; expected a model state dict file")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read a weights file safely (safetensors, or torch.load with weights_only=True)."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: weights file not found (backbone.checkpoint_path)")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        return _unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True), path)
    except CheckpointError:
        raise
    except Exception as exc:  # unpickling refusal, truncation, wrong format
        raise CheckpointError(f"{path}: cannot be read as a weights file ({type(exc).__name__}: {exc})") from exc


def _brief(exc: Exception, limit: int = 600) -> str:
    """``Type: message``, cut short: a strict load lists every one of hundreds of keys."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[:limit] + " ..."


def _load_matching(model: nn.Module, state_dict: dict[str, torch.Tensor], path: str) -> None:
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
                _load_matching(model, state_dict, path)
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
        heads = _attend(block.norm1(x), keep, attn.qkv.weight, attn.qkv.bias, attn.num_heads, attn.q_norm, attn.k_norm)
        return block.drop_path1(block.ls1(attn.proj(attn.norm(heads))))

    @property
    def pools_cls_token(self) -> bool:
        return self.model.global_pool == "token" and isinstance(self.model.fc_norm, nn.Identity)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.norm(tokens), pre_logits=True)


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
        if not Path(path).is_file():
            raise CheckpointError(f"{path}: weights file not found (backbone.checkpoint_path)")
        try:
            open_clip.load_checkpoint(model, path, strict=True, weights_only=True)
        except Exception as exc:
            raise CheckpointError(
                f"{path}: does not load into the configured open_clip model ({_brief(exc)}). "
                "Check backbone.name / backbone.model_kwargs against the file."
            ) from exc

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
        heads = _attend(block.ln_1(x), keep, attn.in_proj_weight, attn.in_proj_bias, attn.num_heads)
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
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: weights file not found (backbone.checkpoint_path)")
    if tag is not None:
        # The tag's preprocessing (mean/std) as on the hub path.
        cfg = open_clip.get_pretrained_cfg(name, tag)
        kwargs["force_preprocess_cfg"] = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}
    try:
        return open_clip.create_model(name, pretrained=path, weights_only=True, **kwargs)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: does not load into the configured open_clip model {name} ({_brief(exc)}). "
            "Check backbone.name / backbone.model_kwargs against the file."
        ) from exc


BACKBONE_FOR_EXPERT = {"visual": TimmViT, "vl": OpenClipViT}


def build_backbone(expert_kind: str, spec: BackboneSpec) -> FrozenViT:
    if expert_kind not in BACKBONE_FOR_EXPERT:
        raise ConfigError(f"expert.kind={expert_kind!r}: choose one of {sorted(BACKBONE_FOR_EXPERT)}")
    # Checkpoints never store the frozen backbone: random initialisations must be reproducible.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.init_seed)
        return BACKBONE_FOR_EXPERT[expert_kind](spec)
