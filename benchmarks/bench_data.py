"""Data loading: decoded and augmented images/s per worker with the library's own dataset and
transforms, on 256-px JPEGs (pre-resized, the fast path) and on 800x600 JPEGs (iNaturalist-sized
originals); DataLoader throughput with 1-2 workers; and the uint8 hand-off (proposed fix) side by side.
Then `lpt prepare` on iNaturalist-sized originals: its cost per image with 1 and 2 processes, and the
read rates of the originals, the resized tree and the LitData shards it writes.
"""
from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks import common as C

CIFAR_ARCHIVE = C.REPO.parent / "shared" / "data" / "cifar10-train-jpeg.tar.gz"


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


def _uint8_train_transform(img_size: int):
    """Proposed hand-off: same augmentation, uint8 CHW tensor (4x fewer bytes through worker IPC);
    the /255 moves to the device, where the backbone normalises anyway."""
    from torchvision import transforms as T

    return T.Compose([T.RandomResizedCrop(img_size), T.RandomHorizontalFlip(), T.PILToTensor()])


def _per_worker(datasets: dict[str, Any], n: int, rounds: int, env: C.Env) -> dict[str, dict[str, float]]:
    def run(ds):
        return lambda: [ds[i] for i in range(n)]

    fns = {name: run(ds) for name, ds in datasets.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what a DataLoader worker runs with
    try:
        times = C.time_interleaved(fns, rounds, 1, env)
    finally:
        torch.set_num_threads(threads)
    return {name: {"images_per_s": n / C.median(ts), "ms_per_image": 1000 * C.median(ts) / n,
                   "images_per_s_best": n / min(ts)} for name, ts in times.items()}


class _DecodeOnly:
    def __init__(self, ds):
        self.ds = ds

    def __getitem__(self, i):
        return self.ds.load_image(i)


def _loader_rate(dataset, workers: int, batch: int, batches: int) -> float:
    from torch.utils.data import DataLoader, RandomSampler

    sampler = RandomSampler(dataset, replacement=True, num_samples=batch * (batches + 2),
                            generator=torch.Generator().manual_seed(0))
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers, persistent_workers=False,
                        prefetch_factor=2 if workers else None)
    it = iter(loader)
    next(it)  # worker start-up and the first batch are not throughput
    t0 = time.perf_counter()
    seen = 0
    for b in it:
        seen += b["image"].shape[0]
    return seen / (time.perf_counter() - t0)


class _Files:
    """A DataSource of the given image files (one class): what `lpt prepare` reads."""

    name = "bench"

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def load(self):
        from lpt_lightning.data import DatasetSplits, Split

        return DatasetSplits("bench", Split(self.paths, np.zeros(len(self.paths), dtype=np.int64)), None, None, ["x"])


def _prepared(root: Path, n: int, env: C.Env, log) -> dict[str, Any]:
    """`lpt prepare` (short side 256, quality 90) of n 800x600 JPEGs with 1 and 2 processes, then the
    read rates of the three copies, train and eval transforms, per worker and with 1-2 DataLoader workers."""
    import shutil

    from lpt_lightning.data import LongTailImageDataset, PreparedSource, build_eval_transform, build_train_transform
    from lpt_lightning.prepare import prepare

    originals = make_jpegs(root / "originals", n, (800, 600), seed=2)
    cost = []
    for fmt, workers in (("litdata", 1), ("litdata", 2), ("tree", 2)):
        out = root / f"prepared_{fmt}_{workers}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        manifest = prepare(_Files(originals), out, fmt=fmt, workers=workers, part_size=64, progress=False)
        seconds = time.perf_counter() - t0
        cost.append({"format": fmt, "processes": workers, "images": n, "seconds": seconds,
                     "seconds_per_10k": seconds / n * 10_000, "kib_per_image": manifest["image_bytes"] / n / 1024})
        log(f"  lpt prepare --format {fmt} --workers {workers}: {n} images in {seconds:.1f} s "
            f"= {cost[-1]['seconds_per_10k']:.0f} s per 10,000 images ({cost[-1]['kib_per_image']:.1f} KiB/image)")
    kib_raw = np.mean([Path(p).stat().st_size for p in originals]) / 1024
    copies = {"raw 800x600 JPEG files": (_Files(originals).load(), None),
              "resized tree (lpt prepare --format tree)": PreparedSource(str(root / "prepared_tree_2")).load(),
              "LitData shards (lpt prepare)": PreparedSource(str(root / "prepared_litdata_2")).load()}
    copies = {name: (c if isinstance(c, tuple) else (c, c.images)) for name, c in copies.items()}
    transforms = {"train": build_train_transform(224), "eval": build_eval_transform(224)}
    sets = {f"{name}, {t}": LongTailImageDataset(splits.train, transform, images=images)
            for name, (splits, images) in copies.items() for t, transform in transforms.items()}
    for d in sets.values():  # warm the page cache
        for i in range(n):
            d[i]
    per_worker = _per_worker(sets, n, 3, env)
    loaders = []
    for name, ds in sets.items():
        if name.endswith("train"):
            for workers in (1, 2):
                rate = _loader_rate(ds, workers, 16, 6)
                loaders.append({"copy": name.rsplit(",", 1)[0], "workers": workers, "images_per_s": rate})
    for name, r in per_worker.items():
        log(f"  {name}: {r['images_per_s']:.0f} img/s per worker")
    for r in loaders:
        log(f"  DataLoader {r['workers']} workers, {r['copy']}, train: {r['images_per_s']:.0f} img/s")
    machine = {"cpu": C.machine_info(env)["cpu"], "date": time.strftime("%Y-%m-%d %H:%M"),
               "load_average": C.load_average()}  # `--only data` keeps the model section's machine line
    return {"n_images": n, "kib_raw": kib_raw, "cost": cost, "per_worker": per_worker, "loaders": loaders,
            "machine": machine}


def run(env: C.Env, quick: bool, log=print) -> dict[str, Any]:
    from lpt_lightning.data import LongTailImageDataset, Split, build_eval_transform, build_train_transform

    n_small, n_big = (48, 16) if quick else (96, 32)
    rounds = 3 if quick else 5
    root = C.scratch_dir()
    t0 = time.perf_counter()
    small = make_jpegs(root / "256", n_small, (256, 256))
    big = make_jpegs(root / "800", n_big, (800, 600), seed=1)
    kb = {"256x256": np.mean([Path(p).stat().st_size for p in small]) / 1024,
          "800x600": np.mean([Path(p).stat().st_size for p in big]) / 1024}
    log(f"  JPEGs: {n_small} at 256x256 ({kb['256x256']:.1f} KiB avg), {n_big} at 800x600 ({kb['800x600']:.1f} KiB avg)")

    def ds(paths, transform):
        return LongTailImageDataset(Split(paths, np.zeros(len(paths), dtype=np.int64)), transform)

    train_t, eval_t, u8_t = build_train_transform(224), build_eval_transform(224), _uint8_train_transform(224)
    small_sets = {
        "decode only (PIL open + RGB)": _DecodeOnly(ds(small, None)),
        "train: decode + RandomResizedCrop + flip + ToTensor (ours)": ds(small, train_t),
        "train, uint8 hand-off: ... + PILToTensor (proposed)": ds(small, u8_t),
        "eval: decode + Resize(256,256) + CenterCrop + ToTensor (ours)": ds(small, eval_t),
    }
    big_sets = {
        "decode only (PIL open + RGB)": _DecodeOnly(ds(big, None)),
        "train: decode + RandomResizedCrop + flip + ToTensor (ours)": ds(big, train_t),
    }
    for d in list(small_sets.values()) + list(big_sets.values()):  # warm the page cache
        for i in range(len(small) if d in small_sets.values() else len(big)):
            d[i]
    per_worker = {"256x256": _per_worker(small_sets, n_small, rounds, env),
                  "800x600": _per_worker(big_sets, n_big, rounds, env)}
    for size, rows in per_worker.items():
        for name, r in rows.items():
            log(f"  {size} {name}: {r['images_per_s']:.0f} img/s per worker ({r['ms_per_image']:.2f} ms/img)")
    loaders = []
    batch, batches = 16, (4 if quick else 8)
    for workers, name, dataset in ((0, "ours, in the main process", small_sets["train: decode + RandomResizedCrop + flip + ToTensor (ours)"]),
                                   (1, "ours", small_sets["train: decode + RandomResizedCrop + flip + ToTensor (ours)"]),
                                   (2, "ours", small_sets["train: decode + RandomResizedCrop + flip + ToTensor (ours)"]),
                                   (2, "uint8 hand-off (proposed)", small_sets["train, uint8 hand-off: ... + PILToTensor (proposed)"])):
        rate = _loader_rate(dataset, workers, batch, batches)
        loaders.append({"workers": workers, "variant": name, "images_per_s": rate, "batch": batch})
        log(f"  DataLoader {workers} workers, {name}: {rate:.0f} img/s")
    prepared = _prepared(root / "prepare", 48 if quick else 192, env, log)
    return {"jpeg_kib": kb, "per_worker": per_worker, "loaders": loaders, "seconds": time.perf_counter() - t0,
            "n_images": {"256x256": n_small, "800x600": n_big}, "prepared": prepared}
