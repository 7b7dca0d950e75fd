"""Map-style dataset over a `Split`, the one-loader view of a training step, batching, the
decoding of JPEGs on the device, and the image check run before training."""
from __future__ import annotations

import contextlib
import io
import itertools
import logging
import multiprocessing
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Literal, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2.functional import pil_to_tensor
from tqdm import tqdm

from lpt_lightning.data.samplers import Draw
from lpt_lightning.data.sources import Split
from lpt_lightning.errors import DataFormatError

log = logging.getLogger(__name__)

# What PIL raises on missing, truncated or garbage files.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
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
        except _DECODE_ERRORS as exc:
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


def worker_processes() -> multiprocessing.context.BaseContext:
    """The start method of the project's process pools: forkserver, not fork. A fork of a process
    that already runs threads (torch's, a loader's, tqdm's monitor) can copy a lock another thread
    holds, and the child then waits on it forever. The fork server is a fresh single-threaded
    process; it imports the worker functions' modules once, so workers do not each import torch."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["lpt_lightning.data.datasets", "lpt_lightning.prepare"])
    return ctx


VerifyMode = Literal["header", "full", "off"]


# The last bytes of a complete file: JPEG's end-of-image marker, PNG's IEND chunk. Searched in the
# file's last _TAIL_BYTES, which leaves room for a little padding after the marker.
_END_MARKERS = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "PNG": b"IEND"}
_TAIL_BYTES = 64


def check_image(path: str, mode: VerifyMode = "header") -> str | None:
    """Why the image at ``path`` is unusable, or None. ``header`` parses the header (missing, empty,
    garbage or unknown-format files) and reads the last bytes of a JPEG or PNG: one without its end
    marker, cut off or with data appended, is decoded to tell the two apart. ``full`` decodes every
    pixel of every file (also finds damage inside the data, in any format)."""
    try:
        with Image.open(path) as img:
            if mode == "full" or not _ends_with_marker(path, img.format):
                img.load()
        return None
    except FileNotFoundError:
        return "does not exist"
    except _DECODE_ERRORS as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _ends_with_marker(path: str, image_format: str | None) -> bool:
    marker = _END_MARKERS.get(image_format or "")
    if marker is None:
        return True  # no end marker to look for: only the full check finds such a file cut off
    with open(path, "rb") as f:
        f.seek(max(f.seek(0, os.SEEK_END) - _TAIL_BYTES, 0))
        return marker in f.read()


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
            pool = stack.enter_context(ProcessPoolExecutor(max_workers=workers, mp_context=worker_processes()))
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
