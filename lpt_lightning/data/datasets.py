"""Image datasets over a `Split` and their batching: one sample per key, one batch per step of every stream."""
from __future__ import annotations

import io
import logging
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate
from torchvision.transforms.v2.functional import pil_to_tensor

from lpt_lightning.data.image_checks import DECODE_ERRORS
from lpt_lightning.data.samplers import Draw
from lpt_lightning.data.sources import Split
from lpt_lightning.errors import DataFormatError

log = logging.getLogger(__name__)

_JPEG_MAGIC = b"\xff\xd8\xff"


class UndecodedImages:
    """A batch's images as the workers read them for ``data.decode_jpeg_on_device``.

    Per image: ``data`` is the file's bytes for a JPEG (uint8 1-D) or, for another format, its
    pixels decoded by the worker (uint8 [3,H,W]); ``seeds`` the `Draw` seeds of the random
    transform (None for an index key); ``sources`` the files, for error messages. A plain object,
    not a sequence, so pin_memory and Lightning's device transfer leave it on the host: nvjpeg
    reads its input from host memory.
    """

    def __init__(self, data: list[torch.Tensor], seeds: list[int | None], sources: list[str]) -> None:
        self.data, self.seeds, self.sources = data, seeds, sources

    def __len__(self) -> int:
        return len(self.data)


class LongTailImageDataset(Dataset):
    """Yields ``{"image": tensor, "label": int64 tensor, "index": int}``.

    File items are opened with PIL and converted to RGB; integer items index ``images`` (uint8,
    grayscale [N,H,W] or colour [N,H,W,3]) and are converted to 3-channel RGB too, so every
    backbone sees 3 channels. With ``skip_unreadable`` an undecodable image yields None
    (dropped by `collate_skipping`) instead of failing the run.

    A key is a dataset index or, from the training samplers, a `Draw`: its seed fixes the random
    augmentation of that one draw, so repeated draws of an image differ yet each is reproducible
    (whatever the worker count). ``index`` is always the dataset index.

    With ``defer_decoding`` (file items only) a sample carries ``image_data`` instead of
    ``image``: (the file's bytes (JPEG) or its decoded pixels (other formats), the draw's seed, the
    file), gathered by `collate_images` into `UndecodedImages`; `decode_on_device` decodes and
    transforms them after the batch reached the device.
    """

    def __init__(
        self,
        split: Split,
        transform: Callable | None,
        images: np.ndarray | None = None,
        skip_unreadable: bool = False,
        defer_decoding: bool = False,
    ) -> None:
        self.split = split
        self.transform = transform
        self.images = images
        self.skip_unreadable = skip_unreadable
        if images is None and len(split) and not isinstance(split.items[0], str):
            raise DataFormatError(f"split from {split.origin}: integer items need the in-memory images array")
        if defer_decoding and len(split) and not isinstance(split.items[0], str):
            raise DataFormatError(f"split from {split.origin}: only image files can be decoded on the device")
        self.defer_decoding = defer_decoding

    def __len__(self) -> int:
        return len(self.split)

    def load_image(self, i: int) -> Image.Image:
        item = self.split.items[i]
        if isinstance(item, str):
            source, what = item, f"{item} (listed in {self.split.origin})"
        else:
            stored = self.images[int(item)]
            if not isinstance(stored, bytes):  # pixels of an in-memory array
                return Image.fromarray(np.asarray(stored)).convert("RGB")
            source, what = io.BytesIO(stored), self.split.where(i)  # an encoded image of a prepared copy
        try:
            with Image.open(source) as img:
                return img.convert("RGB")  # convert() forces the full decode inside the try
        except DECODE_ERRORS as exc:
            raise DataFormatError(f"cannot read image {what}: {exc}") from None

    def __getitem__(self, key: int | Draw) -> dict | None:
        i, seed = (key.index, key.seed) if isinstance(key, Draw) else (key, None)
        try:
            if self.defer_decoding:
                image = self.read_undecoded(i)
            else:
                image = _transform_seeded(self.transform, self.load_image(i), seed)
        except DataFormatError as exc:
            if not self.skip_unreadable:
                raise
            log.warning("skipping unreadable image: %s", exc)
            return None
        label = torch.tensor(int(self.split.labels[i]), dtype=torch.int64)
        if self.defer_decoding:
            return {"image_data": (image, seed, self.split.items[i]), "label": label, "index": i}
        return {"image": image, "label": label, "index": i}

    def read_undecoded(self, i: int) -> torch.Tensor:
        """A JPEG file's bytes, or the decoded pixels of a file in another format."""
        path = self.split.items[i]
        try:
            data = np.fromfile(path, dtype=np.uint8)
        except OSError as exc:
            raise DataFormatError(f"cannot read image {path} (listed in {self.split.origin}): {exc}") from None
        if data[:3].tobytes() == _JPEG_MAGIC:
            return torch.from_numpy(data)
        return pil_to_tensor(self.load_image(i))


def _transform_seeded(transform: Callable | None, image, seed: int | None):
    """``transform(image)``, its random draws from the CPU generator seeded with the draw's seed
    (and restored after): the same crop in a worker and on the device, and no other generator
    (the training process's CUDA ones) touched."""
    if transform is None or seed is None:
        return image if transform is None else transform(image)
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        return transform(image)


def collate_images(samples: list[dict]) -> dict:
    """``default_collate``, except that undecoded images are gathered into one `UndecodedImages`."""
    if not samples or "image_data" not in samples[0]:
        return default_collate(samples)
    out = default_collate([{k: v for k, v in s.items() if k != "image_data"} for s in samples])
    data, seeds, sources = zip(*(s["image_data"] for s in samples))
    out["image_data"] = UndecodedImages(list(data), list(seeds), list(sources))
    return out


def collate_skipping(batch: list[dict | None]) -> dict:
    """Collate, dropping the None entries of unreadable images; ``num_skipped`` counts them."""
    kept = [b for b in batch if b is not None]
    skipped = torch.tensor(len(batch) - len(kept), dtype=torch.int64)
    if not kept:  # every image unreadable: an empty batch the model can recognise and skip
        return {
            "image": torch.empty(0, dtype=torch.uint8),
            "label": torch.empty(0, dtype=torch.int64),
            "index": torch.empty(0, dtype=torch.int64),
            "num_skipped": skipped,
        }
    out = collate_images(kept)
    out["num_skipped"] = skipped
    return out


class StreamBatches(Dataset):
    """A dataset seen through `StreamBatchSampler` keys: one key is a whole training step,
    ``{stream: [keys]}``, and the item is ``{stream: collated batch}``. The DataLoader then runs with
    ``batch_size=None``, and one worker builds all streams' batches of a step."""

    def __init__(self, dataset: Dataset, collate: Callable[[list], dict]) -> None:
        self.dataset = dataset
        self.collate = collate

    def __getitem__(self, step: Mapping[str, Sequence]) -> dict[str, dict]:
        # A dataset that reads whole batches at once (cached expert outputs) gets the keys together.
        fetch = getattr(self.dataset, "__getitems__", None) or (lambda keys: [self.dataset[k] for k in keys])
        return {stream: self.collate(fetch(list(keys))) for stream, keys in step.items()}
