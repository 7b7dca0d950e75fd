"""Where a frozen backbone comes from: its spec (library model, weights, overrides), the
reference models of SPEC 2, and the node-wide order of hub downloads."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lpt_lightning.models.text_cache import cache_dir, node_lock

REFERENCE_BACKBONES = {
    # SPEC 2: the visual expert uses the ImageNet-21k-only AugReg weights, NOT in21k-ft-in1k.
    "timm": "vit_base_patch16_224.augreg_in21k",
    "open_clip": "ViT-B-16",
}


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
