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


def tiny_datamodule(folder, eval_batch_size: int, num_workers: int):
    """A LongTailDataModule over ``tiny_image_folder``: 3 val and 2 test images per class, 32 px."""
    from lpt_lightning.data import ImageFolderSource, LongTailDataModule

    source = ImageFolderSource(root=str(folder), val_per_class=3, test_per_class=2, seed=0, name="tiny")
    return LongTailDataModule(source, batch_size=4, eval_batch_size=eval_batch_size, num_workers=num_workers,
                              img_size=32, pin_memory=False)
