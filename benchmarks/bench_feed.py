"""CPU cost per training image between a prepared shard and the batch the GPU receives, stage by stage,
and the cores that cost means for one H100 in phase 2 (6,000 images/s).

    python benchmarks/bench_feed.py            # writes benchmarks/results/feed_cpu.json, re-renders docs/benchmarks.md
    python benchmarks/bench_feed.py --quick    # fewer images and rounds

Each stage runs the library's own code on the outputs of the stage before it, in one process with
1 torch thread (what a DataLoader worker runs with): read the item's bytes from the LitData shard
(`PreparedSource`), decode (PIL, as `LongTailImageDataset.load_image`), RandomResizedCrop(224),
horizontal flip, PIL -> uint8 tensor (`build_train_transform`'s three steps), the per-draw seeding
(`_transform_seeded`) and collation (`collate_images`). The whole worker item (`StreamBatches`,
every stage at once) is timed beside them as a check on the sum. Pinning runs in the training
process's pin-memory thread, not in the workers, and needs CUDA: not measured here.
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks import common as C  # noqa: E402
from benchmarks import report  # noqa: E402

TARGET = 6000  # images/s one H100 consumes in phase 2 (docs/benchmarks.md, projection)
RESULTS = REPO / "benchmarks" / "results" / "feed_cpu.json"


def run(quick: bool, log=print) -> dict[str, Any]:
    from torchvision.transforms import v2

    from benchmarks.bench_data import _files_source, make_jpegs
    from lpt_lightning.data import LongTailDataModule, PreparedSource
    from lpt_lightning.data.datasets import _transform_seeded, collate_images
    from lpt_lightning.prepare import prepare

    n, rounds = (64, 3) if quick else (256, 9)
    root = C.scratch_dir()
    originals = make_jpegs(root / "originals", 64, (800, 600), seed=4)
    prepare(_files_source((originals * (n // len(originals) + 1))[:n]), root / "shards", fmt="litdata",
            short_side=256, workers=2, part_size=128, progress=False)
    dm = LongTailDataModule(PreparedSource(str(root / "shards")), batch_size=32, sampling="dual", num_workers=0,
                            img_size=224, verify_images="off", pin_memory=False)
    loader = dm.train_dataloader()
    batches = loader.dataset  # StreamBatches: what one worker does per training step
    dataset = batches.dataset
    steps = list(itertools.islice(iter(loader.sampler), max(1, n // 64)))
    keys = [k for step in steps for stream in step.values() for k in stream][:n]
    indices = [k.index for k in keys]

    crop, flip, to_tensor = build = dataset.transform.transforms
    assert [type(t).__name__ for t in build] == ["RandomResizedCrop", "RandomHorizontalFlip", "PILToTensor"]
    flip_always = v2.RandomHorizontalFlip(p=1.0)  # the flip's cost when it flips (half the draws do)

    items = [dataset.split.items[i] for i in indices]
    data = [dataset.images[int(item)] for item in items]
    decoded = [Image.open(io.BytesIO(b)).convert("RGB") for b in data]
    cropped = [crop(img) for img in decoded]
    tensors = [to_tensor(img) for img in cropped]
    samples = [{"image": t, "label": torch.tensor(0), "index": i} for t, i in zip(tensors, indices)]

    stages = {
        "read from shard": lambda: [dataset.images[int(item)] for item in items],
        "decode (PIL, RGB)": lambda: [Image.open(io.BytesIO(b)).convert("RGB") for b in data],
        "RandomResizedCrop(224)": lambda: [crop(img) for img in decoded],
        "horizontal flip (when drawn)": lambda: [flip_always(img) for img in cropped],
        "PIL -> uint8 tensor": lambda: [to_tensor(img) for img in cropped],
        "per-draw seeding": lambda: [_transform_seeded(lambda x: x, img, k.seed) for img, k in zip(cropped, keys)],
        "collate (batches of 32)": lambda: [collate_images(samples[i:i + 32]) for i in range(0, n, 32)],
        "whole worker item (StreamBatches)": lambda: [batches[step] for step in steps],
    }
    images = {name: n for name in stages} | {"whole worker item (StreamBatches)": sum(
        len(k) for step in steps for k in step.values())}
    env = C.make_env("cpu", "fp32")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = C.time_interleaved(stages, rounds, 1, env)
    finally:
        torch.set_num_threads(threads)
    rows = []
    for name, ts in times.items():
        best, med = 1000 * min(ts) / images[name], 1000 * C.median(ts) / images[name]
        rows.append({"stage": name, "ms_per_image_best": best, "ms_per_image": med, "images": images[name]})
        log(f"  {name}: {best:.3f} ms/image (best of {rounds}), median {med:.3f}")
    # A flip is drawn for half the images.
    per_stage = {r["stage"]: r["ms_per_image_best"] for r in rows}
    flips = per_stage["horizontal flip (when drawn)"] * 0.5
    stage_sum = sum(v for k, v in per_stage.items() if k not in ("horizontal flip (when drawn)",
                                                                  "whole worker item (StreamBatches)")) + flips
    whole = per_stage["whole worker item (StreamBatches)"]
    cost = max(whole, stage_sum)  # the larger of the two: the pessimistic figure
    return {"machine": C.machine_info(env), "date": time.strftime("%Y-%m-%d %H:%M"), "quick": quick,
            "images": n, "rounds": rounds, "load_average": C.load_average(), "rows": rows,
            "stage_sum_ms": stage_sum, "whole_item_ms": whole, "target_images_per_s": TARGET,
            "cores_for_target": TARGET * cost / 1000, "cost_ms_used": cost}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    result = run(args.quick, log=lambda m: print(f"[{time.perf_counter() - t0:6.1f}s] {m}", flush=True))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"cores for {TARGET:,} images/s: {result['cores_for_target']:.1f}; wrote {args.out}")
    if args.out == RESULTS:
        doc = REPO / "docs" / "benchmarks.md"
        doc.write_text(report.render(RESULTS.parent))


if __name__ == "__main__":
    main()
