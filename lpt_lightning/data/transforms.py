"""Image transforms (SPEC section 4), torchvision transforms v2.

They return uint8 CHW tensors: the conversion to float and the normalisation happen on the device,
in each expert's backbone (with its own mean/std), so the visual and the vision-language expert
share one loader and host-to-device copies move a quarter of the bytes of float32.

The geometric steps run on PIL images in the loader workers and, with
``data.decode_jpeg_on_device``, on uint8 tensors on the device (``PILToTensor`` passes tensors
through): the same random draws give the same crop boxes and flips in both places.

Test-time augmentation (`TestTimeSpec`) makes the eval transform return several views of an image,
uint8 [V, 3, S, S]; each expert averages its class probabilities over them
(`lpt_lightning.models.expert.view_outputs`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
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


# Views per image of each test-time augmentation: the model passes it multiplies.
TEST_TIME_VIEWS = {"none": 1, "flip": 2, "five_crop": 5, "ten_crop": 10}


@dataclass(frozen=True)
class TestTimeSpec:
    """Test-time augmentation of every evaluation (validation, test, predict, phase 3's outputs).

    Attributes:
        augment: ``none`` (the centre crop), ``flip`` (it and its mirror image), ``five_crop`` (the
            four corner crops and the centre crop of the resized image) or ``ten_crop`` (those and
            their mirror images).
    """

    __test__ = False  # not a pytest test class
    augment: Literal["none", "flip", "five_crop", "ten_crop"] = "none"

    def __post_init__(self) -> None:
        if self.augment not in TEST_TIME_VIEWS:
            raise ConfigError(f"data.test_time.augment must be one of {', '.join(TEST_TIME_VIEWS)}; "
                              f"got {self.augment!r}")

    @property
    def views(self) -> int:
        return TEST_TIME_VIEWS[self.augment]


def _stack_views(views) -> torch.Tensor:
    return torch.stack(list(views))


def _with_mirror(image: torch.Tensor) -> torch.Tensor:
    return torch.stack([image, image.flip(-1)])


def build_eval_transform(img_size: int, augment: str = "none") -> v2.Compose:
    """Resize((r, r)), r = round(img_size*256/224), + CenterCrop(img_size) -> uint8 tensor; with a
    test-time ``augment`` (`TestTimeSpec`) the views of that image stacked: uint8 [V, 3, S, S]."""
    _check(img_size)
    views = TestTimeSpec(augment).views  # checks the name
    r = eval_resize_size(img_size)
    if augment in ("five_crop", "ten_crop"):
        crops = v2.FiveCrop(img_size) if augment == "five_crop" else v2.TenCrop(img_size)
        return v2.Compose([v2.Resize((r, r)), v2.PILToTensor(), crops, _stack_views])
    steps = [v2.Resize((r, r)), v2.CenterCrop(img_size), v2.PILToTensor()]
    return v2.Compose(steps + [_with_mirror] if views == 2 else steps)
