"""Decoding of JPEGs on the device a batch was moved to (``data.decode_jpeg_on_device``)."""
from __future__ import annotations

import logging
import warnings
from typing import Any, Callable

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from lpt_lightning.data.datasets import UndecodedImages, _transform_seeded
from lpt_lightning.errors import DataFormatError

log = logging.getLogger(__name__)


def decode_streams(batch: Any, transform: Callable, skip_unreadable: bool) -> Any:
    """`decode_on_device` on a batch, or on each stream of a training batch."""
    if not isinstance(batch, dict):
        return batch
    if "image_data" in batch:
        return decode_on_device(batch, transform, skip_unreadable)
    return {k: decode_streams(v, transform, skip_unreadable) for k, v in batch.items()}


def decode_on_device(batch: dict, transform: Callable, skip_unreadable: bool = False) -> dict:
    """Replace a batch's `UndecodedImages` by ``image``: uint8 [B,3,S,S] on the batch's device.

    JPEGs are decoded together by ``torchvision.io.decode_jpeg`` on that device (nvjpeg on CUDA,
    libjpeg on CPU); each image is then transformed there under its draw's seed, so the crop
    boxes and flips are those the worker path draws. A JPEG that does not decode fails the run
    naming its file, or with ``skip_unreadable`` is dropped and counted in ``num_skipped``.
    """
    images: UndecodedImages = batch.pop("image_data")
    device = batch["label"].device
    decoded = _decode_jpegs(images, device)
    kept = [i for i, image in enumerate(decoded) if image is not None]
    if len(kept) < len(decoded):
        bad = [images.sources[i] for i, image in enumerate(decoded) if image is None]
        if not skip_unreadable:
            raise DataFormatError(f"cannot decode JPEG {bad[0]}" + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
                                  + "; set data.skip_unreadable=true to train without such images")
        log.warning("skipping %d undecodable JPEGs, e.g. %s", len(bad), bad[0])
        keep = torch.tensor(kept, dtype=torch.int64, device=device)
        for key in ("label", "index"):
            batch[key] = batch[key][keep]
        batch["num_skipped"] = batch["num_skipped"] + len(bad)
    out = [_transform_seeded(transform, decoded[i], images.seeds[i]) for i in kept]
    batch["image"] = torch.stack(out) if out else torch.empty(0, dtype=torch.uint8, device=device)
    return batch


def _decode_jpegs(images: UndecodedImages, device: torch.device) -> list[torch.Tensor | None]:
    """Every image as uint8 [3,H,W] on ``device``: JPEGs decoded in one call (one by one after a
    failure, to find the bad files: None), other formats already decoded by the worker."""
    jpegs = [i for i, data in enumerate(images.data) if data.dim() == 1]
    out: list[torch.Tensor | None] = [data.to(device) if data.dim() == 3 else None for data in images.data]
    if not jpegs:
        return out
    with warnings.catch_warnings():
        # torchvision >= 0.29 deprecates its decoders in favour of TorchCodec; they still work.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision.io")
        try:
            decoded = decode_jpeg([images.data[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            decoded = [_decode_one(images.data[i], device) for i in jpegs]
    for i, image in zip(jpegs, decoded):
        out[i] = image
    return out


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None
