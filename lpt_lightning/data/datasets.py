"""Map-style dataset over a `Split`, plus the image check run before training."""
from __future__ import annotations

import contextlib
import io
import itertools
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate
from tqdm import tqdm

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
        stored = self.images[int(item)]
        if isinstance(stored, bytes):  # an encoded image of a prepared copy (ShardReader)
            try:
                with Image.open(io.BytesIO(stored)) as img:
                    return img.convert("RGB")
            except _DECODE_ERRORS as exc:
                raise DataFormatError(f"cannot read image {self.split.where(i)}: {exc}") from None
        return Image.fromarray(np.asarray(stored)).convert("RGB")

    def __getitem__(self, key: int | Draw) -> dict | None:
        i, seed = (key.index, key.seed) if isinstance(key, Draw) else (key, None)
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


VerifyMode = Literal["header", "full", "off"]


def check_image(path: str, mode: VerifyMode = "header") -> str | None:
    """Why the image at ``path`` is unusable, or None. ``header`` parses the header only (missing,
    empty, garbage or unknown-format files); ``full`` also decodes every pixel (truncated files)."""
    try:
        with Image.open(path) as img:
            if mode == "full":
                img.load()
        return None
    except FileNotFoundError:
        return "does not exist"
    except _DECODE_ERRORS as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _check_chunk(paths: list[str], mode: VerifyMode) -> list[str | None]:
    return [check_image(p, mode) for p in paths]


def verify_images(split: Split, mode: VerifyMode = "header", workers: int = 1, progress: bool = False,
                  sample: int | None = None, show: int = 5) -> int:
    """Check that every image file of ``split`` can be used, before training; DataFormatError
    naming each bad file and the line listing it.

    ``workers`` > 1 checks in that many processes; ``progress`` shows a bar (on a terminal).
    ``sample`` checks only that many evenly spaced items. Returns the number of files checked; in-
    memory array splits have none to check.
    """
    if mode == "off" or not split.items or not isinstance(split.items[0], str):
        return 0
    picks = np.arange(len(split.items))
    if sample is not None and sample < len(picks):
        picks = np.unique(np.linspace(0, len(picks) - 1, num=max(sample, 1)).round().astype(np.int64))
    paths = [split.items[i] for i in picks]
    chunk = 256  # large enough that inter-process traffic is negligible, small enough for a smooth bar
    chunks = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]
    bar = tqdm(total=len(paths), desc=f"checking images ({mode}) of {os.path.basename(split.origin)}",
               unit="img", disable=None if progress else True, leave=False)
    problems: list[str | None] = []
    with contextlib.ExitStack() as stack:
        if workers > 1 and len(chunks) > 1:
            pool = stack.enter_context(ProcessPoolExecutor(max_workers=workers))
            results = pool.map(_check_chunk, chunks, itertools.repeat(mode))
        else:
            results = (_check_chunk(c, mode) for c in chunks)
        for done in results:
            problems.extend(done)
            bar.update(len(done))
    bar.close()
    bad = [(int(i), why) for i, why in zip(picks, problems) if why is not None]
    if bad:
        shown = "\n  ".join(f"{split.items[i]} ({split.where(i)}): {why}" for i, why in bad[:show])
        more = f"\n  ... and {len(bad) - show} more" if len(bad) > show else ""
        raise DataFormatError(
            f"{len(bad)} of {len(paths)} checked images listed in {split.origin} cannot be read:\n  {shown}{more}\n"
            "fix the dataset root or the annotation file, or set data.skip_unreadable=true to train without them"
        )
    return len(paths)
