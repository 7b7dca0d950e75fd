"""Dry run of every shipped GPU entry point on the CPU, at the real architectures and class counts.

Each ``configs/<dataset>_pipeline.yaml`` runs end to end (``lpt pipeline``) and each single-phase
config is parsed and built as ``lpt fit`` builds it, with the real backbones' architectures (random
weights from local files, through ``backbone.checkpoint_path``) on synthetic data in the real
on-disk formats and class counts; batch size, workers, precision, batch limits and epochs are
overridden (see ``OVERRIDES``, ``EPOCHS``). Each entry point is a fresh process: its wall time and
peak RSS go to ``benchmarks/results/dry_run.json``, rendered in docs/benchmarks.md ("Dry run of the
GPU entry points", whose text says the rest). Text embeddings of more than ``--encode-text-max``
class names are read from a cache prefilled with random unit vectors (their cost has its own section).

    python -m benchmarks.dry_run [--jobs 4] [--datasets inat18 ...] [--configs inat18_pipeline ...]
                                 [--only pipelines|phases] [--work DIR]
"""
from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
RESULT = REPO / "benchmarks" / "results" / "dry_run.json"
DOC = REPO / "docs" / "benchmarks.md"
DATASETS = ("inat18", "places_lt", "imagenet_lt", "cifar100_lt")
CLASSES = {"cifar100_lt": 100, "places_lt": 365, "imagenet_lt": 1000, "inat18": 8142}
VIT = "vit_base_patch16_224.augreg_in21k"
WEIGHTS = {"visual": "vit_b16_augreg_in21k_random.safetensors", "vl": "clip_vit_b16_random.pt"}
BATCH = 2
# 2 batches, not 1: the parser types Trainer.limit_*_batches Union[float, int] (typing's cache may
# hand Lightning the float-first Optional[Union[...]]), so "1" arrives as 1.0, every batch.
LIMIT = 2
OVERRIDES = [f"--data.batch_size={BATCH}", "--data.num_workers=0", "--trainer.precision=32-true",
             *(f"--trainer.limit_{split}_batches={LIMIT}" for split in ("train", "val", "test"))]
EPOCHS = {"phase1": 2, "phase2": 2, "phase3": 1}  # phases 1-2 warm up for 1 epoch: a 1-epoch run is refused


# ----------------------------------------------------------------------------- weights and data
def random_weights(folder: Path, kinds: tuple[str, ...] = ("visual", "vl")) -> dict[str, Path]:
    """Random weights of the reference backbones as local files, written once per work folder."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    paths = {kind: folder / WEIGHTS[kind] for kind in kinds}
    if "visual" in paths and not paths["visual"].is_file():
        import timm
        from safetensors.torch import save_file

        torch.manual_seed(0)
        model = timm.create_model(VIT, pretrained=False)  # with its 21k-class head, as the hub file
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(paths["visual"]) + ".tmp")
        os.replace(str(paths["visual"]) + ".tmp", paths["visual"])
    if "vl" in paths and not paths["vl"].is_file():
        import open_clip

        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-16", pretrained=None)  # image and text towers
        torch.save({"state_dict": model.state_dict()}, str(paths["vl"]) + ".tmp")
        os.replace(str(paths["vl"]) + ".tmp", paths["vl"])
    return paths


def image_bytes(fmt: str, variants: int = 8) -> list[bytes]:
    """A few distinct tiny images, encoded once and written under many names."""
    import numpy as np
    from PIL import Image

    out = []
    for i in range(variants):
        pixels = np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format=fmt)
        out.append(buffer.getvalue())
    return out


def write_images(root: Path, relative: list[str], blobs: list[bytes]) -> None:
    for i, rel in enumerate(relative):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blobs[i % len(blobs)])


def train_counts(num_classes: int, held: int) -> list[int]:
    """Two images per class; the first ``held`` classes have 5 so that a held-out split of 5 per
    class at most 20% (data/inat18.yaml) carves one image from each of them and no other."""
    return [5 if c < held else 2 for c in range(num_classes)]


def make_inat(root: Path) -> None:
    """train2018.json / val2018.json (COCO style, names by id as in 2018) + categories.json."""
    blobs = image_bytes("JPEG")
    n = CLASSES["inat18"]
    images, annotations, files = [], [], []

    def add(split: list, c: int) -> None:
        rel = f"train_val2018/Kingdom{c % 6}/{c}/{len(files):08x}.jpg"
        files.append(rel)
        split.append({"id": len(files), "file_name": rel, "width": 32, "height": 32})
        annotations.append({"id": len(files), "image_id": len(files), "category_id": c})

    for c, k in enumerate(train_counts(n, held=4)):
        for _ in range(k):
            add(images, c)
    categories = [{"id": c, "name": str(c), "supercategory": f"Kingdom{c % 6}"} for c in range(n)]
    train = {"images": images, "annotations": annotations, "categories": categories}
    test_images, annotations = [], []
    for c in range(4):
        add(test_images, c)
    test = {"images": test_images, "annotations": annotations, "categories": categories}
    names = [{"id": c, "name": f"Genus{c % 977} species{c}", "supercategory": f"Kingdom{c % 6}"} for c in range(n)]
    root.mkdir(parents=True, exist_ok=True)
    (root / "train2018.json").write_text(json.dumps(train))
    (root / "val2018.json").write_text(json.dumps(test))
    (root / "categories.json").write_text(json.dumps(names))
    write_images(root, files, blobs)


def make_lists(root: Path, dataset: str) -> None:
    """Places-LT (``data_256/a/<class>/...`` lines, ``/a/<class> i`` names) or ImageNet-LT
    (``train/<wnid>/...``, one name per line) lists; val and test lists of 4 images."""
    blobs = image_bytes("JPEG")
    n = CLASSES[dataset]
    places = dataset == "places_lt"

    def folder(c: int, split: str) -> str:
        return f"data_256/{chr(97 + c % 26)}/scene_{c}" if places else f"{split}/n{c:08d}"

    lines = {"train": [], "val": [], "test": []}
    for c, k in enumerate(train_counts(n, held=0)):
        lines["train"] += [f"{folder(c, 'train')}/{c:05d}_{i}.jpg {c}" for i in range(k)]
    for split in ("val", "test"):
        lines[split] = [f"{folder(c, split)}/{split}_{c:05d}.jpg {c}" for c in range(4)]
    root.mkdir(parents=True, exist_ok=True)
    prefix = "Places_LT" if places else "ImageNet_LT"
    for split, rows in lines.items():
        (root / f"{prefix}_{split}.txt").write_text("\n".join(rows) + "\n")
        write_images(root, [r.rsplit(" ", 1)[0] for r in rows], blobs)
    if places:
        (root / "categories_places365.txt").write_text("".join(f"/{chr(97 + c % 26)}/scene_{c} {c}\n"
                                                               for c in range(n)))
    else:
        (root / "imagenet_classnames.txt").write_text("".join(f"object {c}\n" for c in range(n)))


def make_cifar(root: Path) -> None:
    """``train/<class>/*.png`` (100 per class: the fewest with which imbalance ratio 100 leaves the
    last class an image) and ``test/<class>/`` (1 per class)."""
    blobs = image_bytes("PNG")
    for split, k in (("train", 100), ("test", 1)):
        write_images(root / split, [f"class_{c:03d}/{i:04d}.png" for c in range(100) for i in range(k)], blobs)


def prepare(work: Path, datasets: list[str], encode_text_max: int) -> None:
    """Weights, data and (above ``encode_text_max`` class names) the prefilled text cache."""
    os.environ["LPT_CACHE_DIR"] = str(work / "cache")
    weights = random_weights(work / "weights")
    for dataset in datasets:
        start = time.perf_counter()
        make_data(work, dataset)
        if CLASSES[dataset] > encode_text_max:
            prefill_text_cache(work, dataset, weights["vl"])
        print(f"{dataset}: data ready ({time.perf_counter() - start:.0f} s)", flush=True)


def make_data(work: Path, dataset: str) -> None:
    """The dataset under ``work/data/`` where its config's relative root points, once."""
    roots = {"inat18": "inat2018", "places_lt": "places365", "imagenet_lt": "imagenet", "cifar100_lt": "cifar100"}
    root = work / "data" / roots[dataset]
    done = root / ".complete"
    if done.is_file():
        return
    if dataset == "inat18":
        make_inat(root)
    elif dataset == "cifar100_lt":
        make_cifar(root)
    else:
        make_lists(root, dataset)
    done.write_text("")


def prefill_text_cache(work: Path, dataset: str, weights: Path) -> None:
    """Random unit vectors in the text-embedding cache under the key the VL expert's head looks up
    (its text tower's digest, the data's class names, the template)."""
    import importlib

    import torch
    import yaml

    from lpt_lightning.models.backbones import BackboneSpec, build_backbone
    from lpt_lightning.models.expert import ExpertSpec, class_name_to_text
    from lpt_lightning.models.text_cache import cached_text_embeddings

    source = yaml.safe_load((CONFIGS / "data" / f"{dataset}.yaml").read_text())["source"]
    module, _, cls = source["class_path"].rpartition(".")
    init = dict(source["init_args"], root=str(work / source["init_args"]["root"]))  # relative to the work folder
    names = getattr(importlib.import_module(module), cls)(**init).load().class_names
    block = yaml.safe_load((CONFIGS / "expert" / "vl.yaml").read_text())
    backbone = build_backbone("vl", BackboneSpec(**dict(block["backbone"], checkpoint_path=str(weights))))

    class RandomText:
        text_digest = backbone.text_digest
        feature_dim = backbone.feature_dim

        @staticmethod
        def encode_text(prompts: list[str]) -> torch.Tensor:
            return torch.nn.functional.normalize(torch.randn(len(prompts), backbone.feature_dim), dim=-1)

    template = ExpertSpec().text_template
    cached_text_embeddings(RandomText, [class_name_to_text(n, template) for n in names])


# ----------------------------------------------------------------------------- entry points
def pipeline_command(config: Path, run_dir: str, weights: dict[str, Path]) -> list[str]:
    import yaml

    experts = yaml.safe_load(config.read_text()).get("experts") or ["visual", "vl"]
    args = ["pipeline", "--config", str(config), f"--run_dir={run_dir}", *OVERRIDES]
    args += [f"--{phase}.trainer.max_epochs={epochs}" for phase, epochs in EPOCHS.items()]
    args += [f"--phase1.{e}.expert.backbone.checkpoint_path={weights[e]}" for e in experts]
    return args


def phase_command(config: Path, run_dir: str, weights: dict[str, Path]) -> list[str]:
    """``lpt fit`` arguments that build the single-phase config with the upstream checkpoints the
    pipeline run wrote."""
    phase = config.stem.split("_")[-2 if config.stem.endswith("_vl") else -1]
    expert = "vl" if config.stem.endswith("_vl") else "visual"
    args = ["--config", str(config), *OVERRIDES, f"--trainer.max_epochs={EPOCHS[phase]}"]
    if phase == "phase1":
        args.append(f"--model.init_args.expert.backbone.checkpoint_path={weights[expert]}")
    elif phase == "phase2":
        args.append(f"--model.init_args.phase1_checkpoint={run_dir}/phase1_{expert}/final.ckpt")
    else:
        args += [f"--model.init_args.visual_checkpoint={run_dir}/phase2_visual/final.ckpt",
                 f"--model.init_args.vl_checkpoint={run_dir}/phase2_vl/final.ckpt"]
    return args


def build_child(args: list[str]) -> None:
    """Parse and build a phase config as ``lpt fit`` does (model, upstream checkpoints, data)."""
    from lpt_lightning.lightning_cli import LPTCLI

    cli = LPTCLI(args=args, run=False, **LPTCLI.defaults())
    model, data = cli.model, cli.datamodule  # phase 3 has loaded both phase-2 experts here
    assert model.num_classes == data.num_classes == len(data.class_names), (model.num_classes, data.num_classes)
    print(json.dumps({"num_classes": model.num_classes, "train_images": len(data.splits.train)}))


def run_entry(argv: list[str], cwd: Path, env: dict[str, str], log: Path) -> dict:
    """One fresh process: exit status, wall time and peak RSS (of that process alone)."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"ok": proc.returncode == 0, "exit_code": proc.returncode, "seconds": round(time.perf_counter() - start, 1),
            "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2), "log": str(log)}


def dataset_entries(dataset: str, only: str, configs: list[str] | None = None) -> list[tuple[str, Path]]:
    pipelines = sorted(p for p in CONFIGS.glob(f"{dataset}*_pipeline.yaml"))
    phases = sorted(CONFIGS.glob(f"{dataset}_phase*.yaml"))
    entries = ([("pipeline", p) for p in pipelines] if only != "phases" else []) + \
              ([("phase", p) for p in phases] if only != "pipelines" else [])
    return [(kind, p) for kind, p in entries if configs is None or p.stem in configs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/lpt_dry_run"),
                        help="weights, data, runs and logs (kept: weights and data are made once)")
    parser.add_argument("--only", choices=("all", "pipelines", "phases"), default="all",
                        help="phases: build the single-phase configs on an earlier run's checkpoints")
    parser.add_argument("--encode-text-max", type=int, default=400,
                        help="encode up to this many class names; above, fill the text cache with random vectors")
    parser.add_argument("--configs", nargs="+", metavar="STEM", help="only these configs (e.g. inat18_pipeline)")
    parser.add_argument("--jobs", type=int, default=1, help="datasets run at once (each its entry points in turn)")
    parser.add_argument("--result", type=Path, default=RESULT)
    parser.add_argument("--no-docs", action="store_true", help="do not re-render docs/benchmarks.md")
    parser.add_argument("--prepare-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--build-child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.build_child is not None:
        build_child(args.build_child)
        return 0
    work = args.work.resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "LPT_CACHE_DIR": str(work / "cache"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if args.prepare_child:
        prepare(work, args.datasets, args.encode_text_max)
        return 0
    # Weights and data are made in a child: this process stays small, since a child started from it
    # reports at least its peak RSS (Linux keeps the high-water mark across fork and exec).
    subprocess.run([sys.executable, "-m", "benchmarks.dry_run", "--prepare-child", "--work", str(work),
                    "--encode-text-max", str(args.encode_text_max), "--datasets", *args.datasets],
                   cwd=REPO, env=env, check=True)
    weights = {kind: work / "weights" / name for kind, name in WEIGHTS.items()}
    results = json.loads(args.result.read_text()) if args.result.is_file() else {}
    entries = results.setdefault("entries", {})
    command = " ".join(["python -m benchmarks.dry_run", *(argv if argv is not None else sys.argv[1:])])
    results.update(date=time.strftime("%Y-%m-%d %H:%M"), torch=importlib.metadata.version("torch"),
                   cpu_cores=os.cpu_count(), threads=int(os.environ.get("OMP_NUM_THREADS", "0")) or None,
                   jobs=args.jobs, cpu=platform.processor() or platform.machine(), batch_size=BATCH, limit_batches=LIMIT,
                   overrides=OVERRIDES, epochs=EPOCHS, encode_text_max=args.encode_text_max,
                   commands=[*(c for c in results.get("commands", []) if c != command), command])
    lock = threading.Lock()
    failed = []

    def run_dataset(dataset: str) -> None:
        """The dataset's pipelines, then its phase configs built on the pipeline run's checkpoints."""
        run_dir = f"runs/dry_{dataset}"
        for kind, config in dataset_entries(dataset, args.only, args.configs):
            name = str(config.relative_to(REPO))
            if kind == "pipeline":
                own_dir = run_dir if config.name == f"{dataset}_pipeline.yaml" else f"runs/dry_{config.stem}"
                shutil.rmtree(work / own_dir, ignore_errors=True)  # a rerun would skip the finished phases
                argv_ = [sys.executable, "-m", "lpt_lightning.cli", *pipeline_command(config, own_dir, weights)]
                what = "lpt pipeline: every phase, few steps"
            else:
                argv_ = [sys.executable, "-m", "benchmarks.dry_run", "--build-child",
                         *phase_command(config, run_dir, weights)]
                what = "lpt fit config: parsed and built"
            record = run_entry(argv_, work, env, work / "logs" / f"{config.stem}.log")
            with lock:
                entries[name] = {"dataset": dataset, "classes": CLASSES[dataset], "kind": kind, "what": what,
                                 "command": command, **record}
                with open("/proc/loadavg") as fh:
                    results["load_average_end"] = float(fh.read().split()[0])
                args.result.parent.mkdir(parents=True, exist_ok=True)
                args.result.write_text(json.dumps(results, indent=1) + "\n")  # after every entry
                print(f"  {name}: {'ok' if record['ok'] else 'FAILED'} {record['seconds']:.0f} s, "
                      f"{record['peak_rss_gb']:.2f} GB ({record['log']})", flush=True)
                if not record["ok"]:
                    failed.append(name)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(run_dataset, args.datasets))
    if not args.no_docs and args.result == RESULT:  # the page is rendered from benchmarks/results/ only
        from benchmarks.report import render

        DOC.write_text(render(RESULT.parent))
    print(f"wrote {args.result}" + ("" if not failed else f"; FAILED: {', '.join(failed)}"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
