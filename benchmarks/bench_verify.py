"""Cost of the up-front image check (``data.verify_images``) per 10,000 images.

Writes N JPEGs of 500x375 (iNaturalist 2018's typical size) and times ``verify_images`` in
header and full mode with 1 and 2 processes. The files are in the page cache after writing, so
the figures are CPU cost; a cold network file system adds its per-file latency on top.

    python -m benchmarks.bench_verify [--images 10000] [--dir DIR]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from lpt_lightning.data.image_checks import verify_images
from lpt_lightning.data.sources import Split

INAT18_IMAGES = 437_513


def write_images(folder: Path, n: int) -> list[str]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500]
    paths = []
    for i in range(n):
        # Smooth colour gradients plus noise: JPEG sizes near those of photos (tens of kB).
        base = np.stack([(xx * (1 + i % 7)) % 256, (yy * (1 + i % 5)) % 256, (xx + yy + i) % 256], axis=-1)
        img = (base + rng.integers(0, 24, base.shape)).clip(0, 255).astype(np.uint8)
        path = folder / f"{i:06d}.jpg"
        Image.fromarray(img).save(path, quality=90)
        paths.append(str(path))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--dir", help="where to write the images (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        paths = write_images(Path(tmp), args.images)
        size = sum(Path(p).stat().st_size for p in paths) / len(paths)
        split = Split(paths, np.zeros(len(paths), dtype=np.int64), origin="bench")
        rows = []
        for mode in ("header", "full"):
            for workers in (1, 2):
                start = time.perf_counter()
                verify_images(split, mode, workers=workers)
                seconds = (time.perf_counter() - start) * 10_000 / len(paths)
                rows.append({"mode": mode, "processes": workers, "s_per_10k": round(seconds, 1),
                             "inat18_min": round(seconds * INAT18_IMAGES / 10_000 / 60, 1)})
    print(json.dumps({"images": args.images, "mean_jpeg_kB": round(size / 1e3, 1), "results": rows}, indent=1))


if __name__ == "__main__":
    main()
