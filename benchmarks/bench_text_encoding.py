"""Peak memory and time of the VL head's text initialisation for iNaturalist 2018's 8,142 class
names at CLIP ViT-B/16 text-tower shapes (random weights: cost does not depend on them).

Each configuration runs in a fresh process (peak RSS is per process): ``before`` encodes every
name in one batch (the former ``encode_text``), ``after`` in batches of 256 (the current one),
both through ``OpenClipViT.encode_text`` on the CPU. Where all 8,142 names take too long on a
small CPU, ``--names`` measures fewer and the rendered table extrapolates time (linear in the
names) and the one-batch memory (linear in the batch). ``cached`` is what every later process
pays instead (``lpt_lightning.models.text_cache``): the tower's digest and reading the 8,142 x 512
embeddings back. ``--only`` reruns some configurations and keeps the others' saved figures.

    python -m benchmarks.bench_text_encoding [--names 1024] [--threads 2] [--only cached]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import INAT_CLASSES, REPO

RESULT = REPO / "benchmarks" / "results" / "text_encoding.json"
BATCH = 256
CONFIGS = ("before", "after", "cached")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def child(names: int, batch_size: int, threads: int) -> dict:
    import torch

    from lpt_lightning.models.backbones import BackboneSpec, build_backbone
    from lpt_lightning.models.expert import class_name_to_text

    torch.set_num_threads(threads)
    # The ViT-B-16 architecture with random weights (no download); QuickGELU as the OpenAI weights.
    backbone = build_backbone("vl", BackboneSpec(name="ViT-B-16", pretrained=None, quick_gelu=True))
    built = peak_rss_gb()
    if batch_size == 0:  # the cached path: digest, then read back what the first process saved
        start = time.perf_counter()
        backbone.text_digest()
        digest = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "embeddings.pt"
            torch.save(torch.randn(INAT_CLASSES, backbone.feature_dim), path)
            start = time.perf_counter()
            torch.load(path, weights_only=True)
            read = time.perf_counter() - start
            size = path.stat().st_size
        return {"names": INAT_CLASSES, "digest_seconds": digest, "read_seconds": read, "file_mb": size / 1e6,
                "rss_built_gb": built, "peak_rss_gb": peak_rss_gb()}
    prompts = [class_name_to_text(f"Genus{i % 977} species{i}", "a photo of a {}.") for i in range(names)]
    start = time.perf_counter()
    out = backbone.encode_text(prompts, batch_size=batch_size)
    seconds = time.perf_counter() - start
    assert out.shape == (names, 512)
    return {"names": names, "batch_size": batch_size, "seconds": seconds, "rss_built_gb": built,
            "peak_rss_gb": peak_rss_gb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--names", type=int, default=INAT_CLASSES)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--only", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--child", nargs=2, type=int, metavar=("NAMES", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.threads)))
        return
    rows = json.loads(RESULT.read_text()) if RESULT.is_file() and len(args.only) < len(CONFIGS) else {}
    for label in args.only:
        batch = {"before": args.names, "after": BATCH, "cached": 0}[label]
        proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_text_encoding", "--threads", str(args.threads),
                               "--child", str(args.names), str(batch)], cwd=REPO, check=True, capture_output=True,
                              text=True)
        rows[label] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(label, rows[label], flush=True)
    with open("/proc/loadavg") as fh:
        load = fh.read().split()[0]
    import torch

    command = " ".join(["python -m benchmarks.bench_text_encoding", *sys.argv[1:]])
    for label in args.only:
        rows[label] |= {"date": time.strftime("%Y-%m-%d %H:%M"), "load_average_end": float(load), "command": command}
    record = {**rows, "cpu_cores": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
              "cpu": platform.processor() or platform.machine()}
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
