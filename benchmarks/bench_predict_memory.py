"""Peak memory of ``lpt predict`` against the number of images, on a tiny model.

A tiny phase-1 checkpoint over ``--classes`` classes predicts a list of N images (one small PNG
listed N times: the decode cost stays small, the bookkeeping per image is what grows), as a real
``lpt predict`` subprocess, whose peak RSS (ru_maxrss) is reported for each N.

    python -m benchmarks.bench_predict_memory [--images 5000 40000] [--classes 1000] [--src DIR]

``--src`` runs the ``lpt_lightning`` package found in DIR instead (e.g. an earlier commit's
``git archive``), to compare.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)


def write_case(root: Path, classes: int) -> tuple[Path, Path]:
    """The data (one image, a training list naming every class), a phase-1 export and its config."""
    from lpt_lightning.checkpoints import export_safetensors
    from lpt_lightning.models.backbones import BackboneSpec
    from lpt_lightning.models.expert import ExpertSpec
    from lpt_lightning.phases import AdaptPhase

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "img.png")
    (root / "train.txt").write_text("".join(f"img.png {c}\n" for c in range(classes)))
    expert = {"kind": "visual", "prompt_length": 2,
              "backbone": {"name": "vit_base_patch16_224", "pretrained": False, "model_kwargs": TINY}}
    phase = AdaptPhase(expert=ExpertSpec(kind="visual", prompt_length=2, backbone=BackboneSpec(
        name="vit_base_patch16_224", pretrained=False, model_kwargs=dict(TINY))), num_classes=classes)
    torch.save({"state_dict": phase.state_dict(), "lpt": phase.metadata()}, root / "phase1.ckpt")
    export_safetensors(root / "phase1.ckpt", root / "phase1.safetensors")  # predicts without a trainer state
    config = root / "predict.yaml"
    config.write_text(yaml.safe_dump({
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False},
        "model": {"class_path": "lpt_lightning.phases.AdaptPhase", "init_args": {"expert": expert}},
        "data": {"source": {"class_path": "lpt_lightning.data.AnnotationListSource",
                            "init_args": {"root": str(root), "train_list": "train.txt", "val_list": "train.txt"}},
                 "batch_size": 256, "num_workers": 0, "verify_images": "off"},
    }))
    return config, root / "phase1.safetensors"


def peak_rss_mb(config: Path, ckpt: Path, images: Path, out: Path, src: Path) -> float:
    """Peak RSS of one ``lpt predict`` process (its own, not this script's: a fresh child each time)."""
    code = ("import resource, sys; from lpt_lightning.cli import main\n"
            "try:\n    main(sys.argv[1:])\n"
            "finally:\n    print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    result = subprocess.run([sys.executable, "-c", code, "predict", "--config", str(config), "--ckpt_path", str(ckpt),
                             f"--data.predict_paths={images}", f"--prediction.output={out}"],
                            env=env, capture_output=True, text=True, cwd=out.parent)
    if result.returncode:
        raise RuntimeError(result.stderr[-3000:])
    assert len(out.read_text().splitlines()) == int(images.read_text().count("\n")) + 1
    return int(result.stdout.split("PEAK")[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[5000, 40000])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--src", type=Path, default=REPO)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config, ckpt = write_case(root, args.classes)
        for n in args.images:
            images = root / f"images-{n}.txt"
            images.write_text("img.png\n" * n)
            mb = peak_rss_mb(config, ckpt, images, root / f"preds-{n}.csv", args.src.resolve())
            print(f"{n:>7,} images, {args.classes} classes: peak RSS {mb:,.0f} MB")


if __name__ == "__main__":
    main()
