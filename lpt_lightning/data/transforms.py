"""Image transforms (SPEC section 4), torchvision transforms v2.

They return uint8 CHW tensors: the conversion to float and the normalisation happen on the device,
in each expert's backbone (with its own mean/std), so the visual and the vision-language expert
share one loader and host-to-device copies move a quarter of the bytes of float32.

The geometric steps run on PIL images in the loader workers and, with
``data.decode_jpeg_on_device``, on uint8 tensors on the device (``PILToTensor`` passes tensors
through): the same random draws give the same crop boxes and flips in both places.
"""
from __future__ import annotations

from torchvision.transforms import v2

from lpt_lightning.errors import ConfigError


def eval_resize_size(img_size: int) -> int:
    """Side of the square resize before the centre crop: 256 for 224 (the 256/224 ratio)."""
    return int(round(img_size * 256 / 224))


def _check(img_size: int) -> None:
    if not isinstance(img_size, int) or img_size < 1:
        raise ConfigError(f"img_size must be a positive int, got {img_size!r}")


def build_train_transform(img_size: int) -> v2.Compose:
    """RandomResizedCrop(img_size) + horizontal flip -> uint8 tensor [3, img_size, img_size]."""
    _check(img_size)
    return v2.Compose([v2.RandomResizedCrop(img_size), v2.RandomHorizontalFlip(), v2.PILToTensor()])


def build_eval_transform(img_size: int) -> v2.Compose:
    """Resize((r, r)), r = round(img_size*256/224), + CenterCrop(img_size) -> uint8 tensor."""
    _check(img_size)
    r = eval_resize_size(img_size)
    return v2.Compose([v2.Resize((r, r)), v2.CenterCrop(img_size), v2.PILToTensor()])
