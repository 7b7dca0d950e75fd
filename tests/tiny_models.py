"""Tiny random-weight backbones that keep CPU tests fast (shapes of ViT-B/16 only in benchmarks)."""
from lpt_lightning.models.backbones import BackboneSpec

TIMM_TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)
CLIP_TINY = dict(
    embed_dim=24,
    vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=4, head_width=16),
    text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=2),
)


def tiny_backbone(kind: str) -> BackboneSpec:
    if kind == "visual":
        return BackboneSpec(name="vit_base_patch16_224", pretrained=False, model_kwargs=dict(TIMM_TINY))
    return BackboneSpec(pretrained=None, model_kwargs=dict(CLIP_TINY))


def tiny_image_folder(root, counts=(30, 20, 12, 8)):
    """A long-tailed ImageFolder of random 8x8 PNGs (one folder per class) under ``root``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, n in enumerate(counts):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root
