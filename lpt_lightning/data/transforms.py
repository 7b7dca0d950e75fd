"""Image transforms (SPEC section 4).

No normalisation here: each expert's backbone normalises with its own mean/std, so the
visual and the vision-language expert can share one loader.
"""
from __future__ import annotations

from torchvision import transforms as T

from lpt_lightning.errors import ConfigError


def eval_resize_size(img_size: int) -> int:
    """Side of the square resize before the centre crop: 256 for 224 (the 256/224 ratio)."""
    return int(round(img_size * 256 / 224))


def _check(img_size: int) -> None:
    if not isinstance(img_size, int) or img_size < 1:
        raise ConfigError(f"img_size must be a positive int, got {img_size!r}")


def build_train_transform(img_size: int) -> T.Compose:
    """RandomResizedCrop(img_size) + horizontal flip -> float tensor in [0, 1]."""
    _check(img_size)
    return T.Compose([T.RandomResizedCrop(img_size), T.RandomHorizontalFlip(), T.ToTensor()])


def build_eval_transform(img_size: int) -> T.Compose:
    """Resize((r, r)), r = round(img_size*256/224), + CenterCrop(img_size) -> float tensor in [0, 1]."""
    _check(img_size)
    r = eval_resize_size(img_size)
    return T.Compose([T.Resize((r, r)), T.CenterCrop(img_size), T.ToTensor()])
