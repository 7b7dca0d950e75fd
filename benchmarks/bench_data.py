"""Data loading through the library's own loader, on iNaturalist-sized photos.

Photo-like 800x600 JPEGs are prepared with `lpt prepare` (LitData shards and a resized tree, 1 and 2
processes, best of 3 fresh runs: seconds per 10,000 images; shards also at a shorter side of 224). Each copy (raw files,
tree, shards) is then read the way training reads it, through `LongTailDataModule`:

- per worker, in this process with 1 torch thread (what a DataLoader worker runs with): the work a
  worker does for one item of `train_dataloader()` (a `StreamBatchSampler` step through
  `StreamBatches`: both dual streams' images decoded, RandomResizedCrop + flip to uint8, collated)
  and for a batch of `split_dataloader()` (eval transform, the phase-3 outputs pass); plus decoding
  alone and the worker side of ``data.decode_jpeg_on_device`` (file bytes only). Interleaved rounds;
  the best round is the least disturbed by other jobs;
- the real loaders with 1 and 2 worker processes: images/s over both dual streams (training) and
  of the eval loader, fresh workers each round, the first batch of each worker not counted.
"""
from __future__ import annotations

import io
import itertools
import shutil
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks import common as C

CIFAR_ARCHIVE = C.REPO.parent / "shared" / "data" / "cifar10-train-jpeg.tar.gz"
BATCH = 16  # per stream: a training step has 2 x BATCH images
CLASSES = 8
RAW, TREE, SHARDS, SHARDS_224 = ("raw 800x600 JPEG files", "resized tree (lpt prepare --format tree)",
                                 "LitData shards (lpt prepare)", "LitData shards, --short_side 224")


def _source_images(n: int, seed: int = 0) -> list[np.ndarray]:
    """Natural 32x32 images from the CIFAR-10 archive when present, else smooth random patterns."""
    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    if CIFAR_ARCHIVE.is_file():
        with tarfile.open(CIFAR_ARCHIVE) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".jpg") and rng.random() < 0.02:
                    out.append(np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")))
                    if len(out) == n:
                        break
    while len(out) < n:
        out.append((rng.random((8, 8, 3)) * 255).astype(np.uint8))
    return out


def make_jpegs(root: Path, n: int, size: tuple[int, int], quality: int = 90, seed: int = 0) -> list[str]:
    """Photo-like JPEGs: natural images upscaled (bicubic) to ``size`` plus sensor-like noise, so the
    entropy-coded size is close to real photos (a smooth upscale alone decodes unrealistically fast)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, img in enumerate(_source_images(n, seed)):
        big = np.asarray(Image.fromarray(img).resize(size, Image.BICUBIC), dtype=np.float32)
        big = np.clip(big + rng.normal(0, 6, big.shape), 0, 255).astype(np.uint8)
        path = root / f"{i:04d}.jpg"
        Image.fromarray(big).save(path, quality=quality)
        paths.append(str(path))
    return paths


def _files_source(paths: list[str]):
    """A DataSource of the given image files (CLASSES classes, no val/test): what `lpt prepare` reads."""
    from lpt_lightning.data import DatasetSplits, DataSource, Split

    class BenchFiles(DataSource):
        name = "bench"

        def load(self) -> DatasetSplits:
            labels = np.arange(len(paths)) % CLASSES
            return DatasetSplits("bench", Split(list(paths), labels, origin="benchmark JPEGs"), None, None,
                                 [f"class {c}" for c in range(CLASSES)])

    return BenchFiles()


def _datamodule(source, workers: int, decode_on_device: bool = False):
    from lpt_lightning.data import LongTailDataModule

    return LongTailDataModule(source, batch_size=BATCH, eval_batch_size=2 * BATCH, sampling="dual",
                              num_workers=workers, img_size=224, verify_images="off", pin_memory=False,
                              decode_jpeg_on_device=decode_on_device)


def _train_work(dm, steps: int) -> tuple[Callable[[], Any], int]:
    """What a worker of ``dm.train_dataloader()`` does for ``steps`` steps, and their image count."""
    loader = dm.train_dataloader()
    keys = list(itertools.islice(iter(loader.sampler), steps))
    batches = loader.dataset  # StreamBatches
    return (lambda: [batches[step] for step in keys]), sum(len(k) for step in keys for k in step.values())


def _eval_work(dm, images: int) -> tuple[Callable[[], Any], int]:
    """What a worker of ``dm.split_dataloader("train")`` (the phase-3 outputs pass) does for ``images``."""
    loader = dm.split_dataloader("train")
    dataset, collate, size = loader.dataset, loader.collate_fn, loader.batch_size
    index = list(loader.sampler)[:images]
    chunks = [index[i:i + size] for i in range(0, len(index), size)]
    return (lambda: [collate([dataset[i] for i in chunk]) for chunk in chunks]), len(index)


def _decode_work(dm, images: int) -> tuple[Callable[[], Any], int]:
    dataset = dm.split_dataloader("train").dataset
    return (lambda: [dataset.load_image(i) for i in range(images)]), images


def _batch_images(batch: dict) -> int:
    """Images in a batch, summed over the streams of a training batch."""
    if "image" in batch:
        return batch["image"].shape[0]
    return sum(_batch_images(b) for b in batch.values())


def _loader_rate(loader, workers: int) -> float:
    """Images/s of one pass over ``loader``, from the moment every worker delivered its first batch
    (start-up is not throughput)."""
    it = iter(loader)
    for _ in range(max(workers, 1)):
        next(it)
    t0 = time.perf_counter()
    seen = sum(_batch_images(batch) for batch in it)
    return seen / (time.perf_counter() - t0)


def _rates(times: dict[str, list[float]], images: dict[str, int]) -> dict[str, dict[str, float]]:
    return {name: {"images_per_s_best": images[name] / min(ts), "images_per_s": images[name] / C.median(ts),
                   "ms_per_image_best": 1000 * min(ts) / images[name], "rounds": len(ts)}
            for name, ts in times.items()}


def _prepare_cost(originals: list[str], root: Path, rounds: int, log) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """`lpt prepare` of the originals per format, process count and short side: best of ``rounds``
    fresh runs (interleaved), and the copies it wrote."""
    from lpt_lightning.prepare import prepare

    configs = (("litdata", 1, 256), ("litdata", 2, 256), ("tree", 1, 256), ("tree", 2, 256), ("litdata", 2, 224))
    seconds: dict[tuple, list[float]] = {c: [] for c in configs}
    copies, stored = {}, {}
    for _ in range(rounds):
        for fmt, workers, short_side in configs:
            out = root / f"prepared_{fmt}_{workers}_{short_side}"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            manifest = prepare(_files_source(originals), out, fmt=fmt, short_side=short_side, workers=workers,
                               part_size=64, progress=False)
            seconds[(fmt, workers, short_side)].append(time.perf_counter() - t0)
            copies[(fmt, short_side)], stored[(fmt, workers, short_side)] = out, manifest["image_bytes"]
    n, cost = len(originals), []
    for (fmt, workers, short_side), ts in seconds.items():
        cost.append({"format": fmt, "processes": workers, "short_side": short_side, "images": n, "seconds": min(ts),
                     "seconds_median": C.median(ts), "rounds": len(ts), "seconds_per_10k": min(ts) / n * 10_000,
                     "kib_per_image": stored[(fmt, workers, short_side)] / n / 1024})
        log(f"  lpt prepare --format {fmt} --workers {workers} --short_side {short_side}: {n} images in "
            f"{min(ts):.1f} s (best of {len(ts)}) = {cost[-1]['seconds_per_10k']:.0f} s per 10,000 "
            f"({cost[-1]['kib_per_image']:.1f} KiB/image)")
    return cost, copies


def run(env: C.Env, quick: bool, log=print) -> dict[str, Any]:
    from lpt_lightning.data import PreparedSource

    n = 64 if quick else 384
    rounds, loader_rounds = (3, 1) if quick else (15, 9)
    worker_images = 32 if quick else 128  # per round and pipeline
    root = C.scratch_dir()
    originals = make_jpegs(root / "originals", n, (800, 600), seed=2)
    kib_raw = float(np.mean([Path(p).stat().st_size for p in originals]) / 1024)
    log(f"  {n} JPEGs at 800x600, {kib_raw:.1f} KiB on average")
    cost, prepared = _prepare_cost(originals, root, 1 if quick else 3, log)
    sources = {RAW: _files_source(originals), TREE: PreparedSource(str(prepared[("tree", 256)])),
               SHARDS: PreparedSource(str(prepared[("litdata", 256)])),
               SHARDS_224: PreparedSource(str(prepared[("litdata", 224)]))}

    # Per worker: every pipeline of every copy, interleaved round-robin.
    work, images = {}, {}
    steps = worker_images // (2 * BATCH)
    for copy, source in sources.items():
        dm = _datamodule(source, 0)
        for transform, (fn, count) in (("decode only", _decode_work(dm, worker_images)),
                                       ("train", _train_work(dm, steps)), ("eval", _eval_work(dm, worker_images))):
            if copy == SHARDS_224 and transform == "decode only":
                continue
            work[f"{copy} | {transform}"], images[f"{copy} | {transform}"] = fn, count
        if copy in (RAW, TREE):  # image files only: the shards' items are not files
            fn, count = _train_work(_datamodule(source, 0, decode_on_device=True), steps)
            work[f"{copy} | train, data.decode_jpeg_on_device (worker side)"] = fn
            images[f"{copy} | train, data.decode_jpeg_on_device (worker side)"] = count
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what a DataLoader worker runs with
    try:
        per_worker = _rates(C.time_interleaved(work, rounds, 1, env), images)
    finally:
        torch.set_num_threads(threads)
    for name, r in per_worker.items():
        log(f"  per worker, {name}: best {r['images_per_s_best']:.0f}, median {r['images_per_s']:.0f} images/s")

    # The real loaders, 1 and 2 worker processes, rounds interleaved across configurations.
    configs = [(copy, kind, workers) for copy in (RAW, TREE, SHARDS) for kind in ("train", "eval") for workers in (1, 2)]
    loader_times: dict[tuple, list[float]] = {c: [] for c in configs}
    for r in range(loader_rounds):
        for copy, kind, workers in configs[r % len(configs):] + configs[:r % len(configs)]:
            dm = _datamodule(sources[copy], workers)
            loader = dm.train_dataloader() if kind == "train" else dm.split_dataloader("train")
            loader_times[(copy, kind, workers)].append(_loader_rate(loader, workers))
    loaders = [{"copy": copy, "loader": kind, "workers": workers, "images_per_s_best": max(rates),
                "images_per_s": C.median(rates), "rounds": len(rates)}
               for (copy, kind, workers), rates in loader_times.items()]
    for r in loaders:
        log(f"  {r['loader']} loader, {r['workers']} workers, {r['copy']}: best {r['images_per_s_best']:.0f}, "
            f"median {r['images_per_s']:.0f} images/s")
    shutil.rmtree(root, ignore_errors=True)
    return {"n_images": n, "kib_raw": kib_raw, "batch_per_stream": BATCH, "eval_batch": 2 * BATCH,
            "worker_images_per_round": worker_images, "cost": cost, "per_worker": per_worker, "loaders": loaders}
