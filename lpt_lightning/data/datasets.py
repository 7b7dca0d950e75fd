"""Map-style dataset over a `Split`, plus the file check run before training."""
from __future__ import annotations

import logging
import os
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from lpt_lightning.data.samplers import Draw
from lpt_lightning.data.sources import Split
from lpt_lightning.errors import DataFormatError

log = logging.getLogger(__name__)

# What PIL raises on missing, truncated or garbage files.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class LongTailImageDataset(Dataset):
    """Yields ``{"image": tensor, "label": int64 tensor, "index": int}``.

    File items are opened with PIL and converted to RGB; integer items index ``images`` (uint8,
    grayscale [N,H,W] or colour [N,H,W,3]) and are converted to 3-channel RGB too, so every
    backbone sees 3 channels. With ``skip_unreadable`` an undecodable image yields None
    (dropped by `collate_skipping`) instead of failing the run.

    A key is a dataset index or, from the training samplers, a `Draw`: its seed fixes the random
    augmentation of that one draw, so repeated draws of an image differ yet each is reproducible
    (whatever the worker count). ``index`` is always the dataset index.
    """

    def __init__(
        self,
        split: Split,
        transform: Callable | None,
        images: np.ndarray | None = None,
        skip_unreadable: bool = False,
    ) -> None:
        self.split = split
        self.transform = transform
        self.images = images
        self.skip_unreadable = skip_unreadable
        self.load_images = True  # False: label and index only (models training on cached outputs)
        if images is None and len(split) and not isinstance(split.items[0], str):
            raise DataFormatError(f"split from {split.origin}: integer items need the in-memory images array")

    def __len__(self) -> int:
        return len(self.split)

    def load_image(self, i: int) -> Image.Image:
        item = self.split.items[i]
        if isinstance(item, str):
            try:
                with Image.open(item) as img:
                    return img.convert("RGB")  # convert() forces the full decode inside the try
            except _DECODE_ERRORS as exc:
                raise DataFormatError(
                    f"cannot read image {item} (listed in {self.split.origin}): {exc}"
                ) from None
        return Image.fromarray(np.asarray(self.images[int(item)])).convert("RGB")

    def __getitem__(self, key: int | Draw) -> dict | None:
        i, seed = (key.index, key.seed) if isinstance(key, Draw) else (key, None)
        if not self.load_images:
            return {"label": torch.tensor(int(self.split.labels[i]), dtype=torch.int64), "index": i}
        try:
            img = self.load_image(i)
        except DataFormatError as exc:
            if not self.skip_unreadable:
                raise
            log.warning("skipping unreadable image: %s", exc)
            return None
        image = self._apply_transform(img, seed)
        return {"image": image, "label": torch.tensor(int(self.split.labels[i]), dtype=torch.int64), "index": i}

    def _apply_transform(self, img, seed: int | None):
        if self.transform is None:
            return img
        if seed is None:
            return self.transform(img)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(img)


def collate_skipping(batch: list[dict | None]) -> dict:
    """Collate, dropping the None entries of unreadable images; ``num_skipped`` counts them."""
    kept = [b for b in batch if b is not None]
    skipped = torch.tensor(len(batch) - len(kept), dtype=torch.int64)
    if not kept:  # every image unreadable: an empty batch the model can recognise and skip
        return {
            "image": torch.empty(0),
            "label": torch.empty(0, dtype=torch.int64),
            "index": torch.empty(0, dtype=torch.int64),
            "num_skipped": skipped,
        }
    out = default_collate(kept)
    out["num_skipped"] = skipped
    return out


def verify_files(split: Split, sample: int | None = None, show: int = 5) -> int:
    """Check that the split's image files exist (os.path.isfile only: fast, no decoding).

    ``sample`` checks only that many evenly spaced items (for very large sets). Returns the
    number of files checked; in-memory array splits have none to check.
    """
    paths = [p for p in split.items if isinstance(p, str)]
    if not paths:
        return 0
    if sample is not None and sample < len(paths):
        picks = np.linspace(0, len(paths) - 1, num=max(sample, 1)).round().astype(np.int64)
        paths = [paths[i] for i in np.unique(picks)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        shown = "\n  ".join(missing[:show])
        more = f"\n  ... and {len(missing) - show} more" if len(missing) > show else ""
        raise DataFormatError(
            f"{len(missing)} of {len(paths)} checked image files listed in {split.origin} do not exist:\n  "
            f"{shown}{more}\nfix the dataset root or the annotation file "
            "(or set data.skip_unreadable=true to train without them)"
        )
    return len(paths)
