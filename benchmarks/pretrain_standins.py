"""Pretrain the two small stand-in experts offline; writes weights/standins/.

    python benchmarks/pretrain_standins.py                 # about 35 min on 1 CPU thread
    python benchmarks/pretrain_standins.py --only vit      # one stand-in (two processes side by side halve the wall time)
    python benchmarks/pretrain_standins.py --device cuda --epochs 40 --out runs/standins_big

No hub weights can be downloaded where this project is tested, so the experts' frozen backbones
are stand-ins pretrained here: a small timm ViT (supervised) and a small open_clip CLIP (contrastive,
captions "a photo of a {label}."), on Fashion-MNIST and CIFAR-10 images disjoint from every
long-tailed task's (``target_slices``) and with coarser labels (``VISUAL_LABELS`` / ``CLIP_LABELS``),
as real backbones never saw the target's images or label space. How and why, with the figures:
weights/standins/MODEL_CARD.md (rendered by ``model_card`` from ``benchmarks/templates/standins.md``).
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import functional as TF

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.common import template  # noqa: E402
from lpt_lightning.data import FASHION_MNIST_CLASSES, build_eval_transform, eval_resize_size, read_idx, target_slices  # noqa: E402
from lpt_lightning.data.sources import FASHION_MNIST_DEFAULT_DIR  # noqa: E402
from lpt_lightning.models.backbones import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # noqa: E402
from lpt_lightning.models.expert import ExpertSpec, class_name_to_text  # noqa: E402

SEED = 0
FMNIST_VAL_PER_CLASS = 100
CIFAR_VAL_PER_CLASS = 100
CIFAR_TEST_PER_CLASS = 500
# Pools the long-tailed training sets are drawn from (n_max of the study and the demo).
FMNIST_POOL_PER_CLASS = 1000
CIFAR_POOL_PER_CLASS = 500
IMG_SIZE = 32
DEFAULT_ARCHIVE = "../shared/data/cifar10-train-jpeg.tar.gz"
DEFAULT_OUT = "weights/standins"
VIT_FILE = "vit_standin.safetensors"
CLIP_FILE = "clip_standin.safetensors"

VIT_NAME = "vit_base_patch16_224"  # timm's ViT family; model_kwargs make it small
VIT_KWARGS = {"img_size": IMG_SIZE, "patch_size": 4, "embed_dim": 96, "depth": 6, "num_heads": 3, "mlp_ratio": 2.0}
CLIP_KWARGS = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": IMG_SIZE, "patch_size": 4, "width": 96, "layers": 6, "head_width": 32,
                   "mlp_ratio": 2.0},
    # vocab_size and context_length match open_clip's SimpleTokenizer, which OpenClipViT builds.
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3},
}
TEXT_TEMPLATE = ExpertSpec().text_template  # the template of the VL expert's text-initialised head

# Pretraining label spaces: coarse label -> the target classes it merges; every other class keeps
# its own label. Shared by both: one blind spot per dataset (Sneaker, cat/dog); the rest differs.
VISUAL_LABELS = {"top": ["T-shirt/top", "Shirt"], "shoe": ["Sandal", "Sneaker"],
                 "pet": ["cat", "dog"], "hoofed animal": ["deer", "horse"]}
CLIP_LABELS = {"jacket": ["Pullover", "Coat"], "shoe": ["Sneaker", "Ankle boot"],
               "car": ["automobile", "truck"], "pet": ["cat", "dog"]}


def pretraining_labels(class_names: list[str], merges: dict[str, list[str]]) -> tuple[list[str], list[int]]:
    """(label names, label of each target class): merged classes share their coarse label, the
    others keep their name; labels in order of first appearance."""
    coarse_of = {member: coarse for coarse, members in merges.items() for member in members}
    names: list[str] = []
    mapping = []
    for cls in class_names:
        name = coarse_of.get(cls, cls)
        if name not in names:
            names.append(name)
        mapping.append(names.index(name))
    return names, mapping


# ------------------------------------------------------------------------------------- data


def read_cifar10_archive(archive: Path) -> tuple[list[str], np.ndarray, list[str], list[bytes]]:
    """(member names, labels, class names, JPEG bytes) of ``train/<class>/<image>`` in the order
    ``ImageFolderSource`` lists the extracted folder: classes, then files, sorted by name."""
    with tarfile.open(archive) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()
                 if m.isfile() and len(Path(m.name).parts) == 3}
    names = sorted(files)  # "train/<class>/<image>": by class, then by file name
    classes = sorted({Path(n).parts[1] for n in names})
    labels = np.array([classes.index(Path(n).parts[1]) for n in names], dtype=np.int64)
    return names, labels, classes, [files[n] for n in names]


def carve_cifar10(labels: np.ndarray, seed: int = SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(val, test, long-tail pool, pretraining) indices into the sorted archive listing; the slices of
    ``ImageFolderSource(val_per_class=100, test_per_class=500, train_pool_per_class=500, seed=0)``."""
    return target_slices(labels, CIFAR_VAL_PER_CLASS, CIFAR_TEST_PER_CLASS, CIFAR_POOL_PER_CLASS, seed)


def carve_fashion_mnist(labels: np.ndarray, seed: int = SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(val, long-tail pool, pretraining) indices into the official training split; the slices of
    ``FashionMNISTSource(val_per_class=100, train_pool_per_class=1000, seed=0)``."""
    val, _, pool, rest = target_slices(labels, FMNIST_VAL_PER_CLASS, 0, FMNIST_POOL_PER_CLASS, seed)
    return val, pool, rest


def _idx_file(root: Path, base: str) -> Path:
    return root / base if (root / base).is_file() else root / f"{base}.gz"


def resized(images: list[Image.Image], size: int) -> torch.Tensor:
    """uint8 [N, 3, size, size]: RGB, squashed to size x size exactly as build_eval_transform does."""
    return torch.stack([TF.pil_to_tensor(TF.resize(img.convert("RGB"), [size, size])) for img in images])


class PretrainingData:
    """Pretraining pools and validation slices of both datasets as uint8 tensors [N, 3, H, W].

    Fashion-MNIST is stored after the eval transform (32x32); CIFAR-10 pretraining images at the
    37x37 resize, so training can take random crops (its val slice: the centre crop).
    """

    def __init__(self, fmnist_root: str | None, archive: Path, seed: int):
        root = Path(fmnist_root or os.environ.get("LPT_FASHION_MNIST_DIR") or FASHION_MNIST_DEFAULT_DIR)
        # Only the training IDX files are read: t10k is the downstream test split.
        fm_pixels = read_idx(_idx_file(root, "train-images-idx3-ubyte"), expected_ndim=3)
        fm_labels = read_idx(_idx_file(root, "train-labels-idx1-ubyte"), expected_ndim=1).astype(np.int64)
        fm_val, fm_pool, fm_rest = carve_fashion_mnist(fm_labels, seed)
        transform = build_eval_transform(IMG_SIZE)
        fm_images = torch.stack([transform(Image.fromarray(x).convert("RGB")) for x in fm_pixels])  # uint8

        names, c_labels, c_classes, jpegs = read_cifar10_archive(archive)
        c_val, c_test, c_pool, c_rest = carve_cifar10(c_labels, seed)
        c_images = resized([Image.open(io.BytesIO(b)) for b in jpegs], eval_resize_size(IMG_SIZE))
        c_labels = torch.from_numpy(c_labels + len(FASHION_MNIST_CLASSES))  # CIFAR-10 follows Fashion-MNIST
        fm_labels = torch.from_numpy(fm_labels)

        self.class_names = list(FASHION_MNIST_CLASSES) + c_classes
        self.train = {"fashion_mnist": (fm_images[fm_rest], fm_labels[fm_rest]),
                      "cifar10": (c_images[c_rest], c_labels[c_rest])}
        self.val = {"fashion_mnist": (fm_images[fm_val], fm_labels[fm_val]),
                    "cifar10": (TF.center_crop(c_images[c_val], [IMG_SIZE]), c_labels[c_val])}
        self.slices = {
            "seed": seed,
            "fashion_mnist": {
                "split": "train-images-idx3-ubyte (the official training split; t10k is never read)",
                "val_per_class": FMNIST_VAL_PER_CLASS,
                "train_pool_per_class": FMNIST_POOL_PER_CLASS,
                "val_indices": fm_val.tolist(),
                "pool_indices": fm_pool.tolist(),
                "reproduce": (f"FashionMNISTSource(val_per_class={FMNIST_VAL_PER_CLASS}, "
                              f"train_pool_per_class={FMNIST_POOL_PER_CLASS}, seed={seed}): its val split, and every "
                              "long-tailed training set it draws"),
            },
            "cifar10": {
                "archive": archive.name,
                "classes": c_classes,
                "val_per_class": CIFAR_VAL_PER_CLASS,
                "test_per_class": CIFAR_TEST_PER_CLASS,
                "train_pool_per_class": CIFAR_POOL_PER_CLASS,
                "val_files": [names[i] for i in c_val],
                "test_files": [names[i] for i in c_test],
                "pool_files": [names[i] for i in c_pool],
                "reproduce": (f"ImageFolderSource(root=<extracted train/>, val_per_class={CIFAR_VAL_PER_CLASS}, "
                              f"test_per_class={CIFAR_TEST_PER_CLASS}, train_pool_per_class={CIFAR_POOL_PER_CLASS}, "
                              f"seed={seed}): its val and test splits, and every long-tailed training set it draws"),
            },
        }

    def pretraining_counts(self) -> dict[str, int]:
        return {dataset: len(labels) for dataset, (_, labels) in self.train.items()}

    def epoch_batches(self, per_class: dict[str, int], batch_size: int, generator: torch.Generator):
        """Batches of one epoch: a fresh balanced draw of per_class[dataset] images of every class
        (without replacement), shuffled together; CIFAR-10 images randomly cropped and flipped."""
        picks = []
        for dataset, (_, labels) in self.train.items():
            for c in labels.unique():
                members = torch.nonzero(labels == c).flatten()
                k = min(per_class[dataset], members.numel())
                chosen = members[torch.randperm(members.numel(), generator=generator)[:k]]
                picks.append(torch.stack([torch.full_like(chosen, int(dataset == "cifar10")), chosen], 1))
        picks = torch.cat(picks)
        picks = picks[torch.randperm(len(picks), generator=generator)]
        for start in range(0, len(picks) - batch_size + 1, batch_size):
            batch = picks[start:start + batch_size]
            (fm_images, fm_labels), (c_images, c_labels) = self.train["fashion_mnist"], self.train["cifar10"]
            fm_idx, c_idx = batch[batch[:, 0] == 0, 1], batch[batch[:, 0] == 1, 1]
            images = torch.cat([fm_images[fm_idx], self._augment(c_images[c_idx], generator)])
            labels = torch.cat([fm_labels[fm_idx], c_labels[c_idx]])
            yield images, labels

    @staticmethod
    def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, margin = len(images), images.shape[-1] - IMG_SIZE
        offsets = torch.randint(0, margin + 1, (n, 2), generator=generator).tolist()
        crops = torch.stack([img[:, y:y + IMG_SIZE, x:x + IMG_SIZE] for img, (y, x) in zip(images, offsets)])
        flip = torch.rand(n, generator=generator) < 0.5
        return torch.where(flip[:, None, None, None], crops.flip(-1), crops)


# ------------------------------------------------------------------------------------- models


class ViTStandin(torch.nn.Module):
    """timm ViT with a linear head over its pretraining labels; normalises with the mean/std TimmViT will use."""

    def __init__(self, label_names: list[str]):
        super().__init__()
        import timm

        self.label_names = list(label_names)
        self.model = timm.create_model(VIT_NAME, pretrained=False, num_classes=len(label_names), **VIT_KWARGS)
        cfg = self.model.pretrained_cfg or {}
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.5, 0.5, 0.5))).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.5, 0.5, 0.5))).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images.float() / 255 - self.mean) / self.std)


class ClipStandin(torch.nn.Module):
    """open_clip CLIP; logits = scaled cosine between image embeddings and the embeddings of the
    captions of its pretraining labels, so the text tower learns only those words."""

    def __init__(self, label_names: list[str]):
        super().__init__()
        import open_clip

        self.label_names = list(label_names)
        self.model = open_clip.CLIP(**CLIP_KWARGS)
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=self.model.context_length)
        self.register_buffer("captions", self.tokenize(label_names), persistent=False)
        cfg = open_clip.get_model_preprocess_cfg(self.model)
        self.register_buffer("mean", torch.tensor(cfg.get("mean", OPENAI_CLIP_MEAN)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.get("std", OPENAI_CLIP_STD)).view(1, 3, 1, 1), persistent=False)

    def tokenize(self, names: list[str]) -> torch.Tensor:
        return self.tokenizer([class_name_to_text(n, TEXT_TEMPLATE) for n in names])

    def forward(self, images: torch.Tensor, captions: torch.Tensor | None = None) -> torch.Tensor:
        image = self.model.encode_image((images.float() / 255 - self.mean) / self.std, normalize=True)
        text = self.model.encode_text(self.captions if captions is None else captions, normalize=True)
        return self.model.logit_scale.exp() * image @ text.t()


def round_to_half(model: torch.nn.Module) -> None:
    """Round the weights to float16 (the saved precision), so evaluation measures the saved model."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())


def param_counts(standin: torch.nn.Module) -> dict[str, int]:
    m = standin.model
    if isinstance(standin, ClipStandin):
        visual = sum(p.numel() for p in m.visual.parameters())
        total = sum(p.numel() for p in m.parameters())
        return {"image_tower": visual, "text_tower_and_logit_scale": total - visual, "total": total}
    head = sum(p.numel() for p in m.head.parameters())
    total = sum(p.numel() for p in m.parameters())
    return {"backbone": total - head, "classification_head": head, "total": total}


# ------------------------------------------------------------------------------------- training


def train(standin: torch.nn.Module, label_map: torch.Tensor, data: PretrainingData, args: argparse.Namespace,
          log) -> dict:
    """Cross-entropy on the stand-in's pretraining labels (label_map[target class])."""
    device = torch.device(args.device)
    standin.to(device)
    label_map = label_map.to(device)
    per_class = {"fashion_mnist": args.fmnist_per_class, "cifar10": args.cifar_per_class}
    steps_per_epoch = (10 * args.fmnist_per_class + 10 * args.cifar_per_class) // args.batch_size
    total_steps = steps_per_epoch * args.epochs
    warmup = max(1, total_steps // 20)
    # No weight decay on norms, biases and the logit scale (the usual ViT / CLIP recipe).
    decay = [p for p in standin.parameters() if p.ndim >= 2]
    no_decay = [p for p in standin.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total_steps - warmup))))
    generator = torch.Generator().manual_seed(args.seed)
    start = time.time()
    step = 0
    for epoch in range(args.epochs):
        standin.train()
        running, seen = 0.0, 0
        for images, labels in data.epoch_batches(per_class, args.batch_size, generator):
            images, labels = images.to(device), label_map[labels.to(device)]
            loss = F.cross_entropy(standin(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            running += loss.item() * len(labels)
            seen += len(labels)
            if step % 50 == 0:
                log(f"  step {step}/{total_steps} loss {loss.item():.3f} ({time.time() - start:.0f} s)")
        log(f"  epoch {epoch + 1}/{args.epochs}: mean loss {running / seen:.3f}, {time.time() - start:.0f} s")
    return {"train_seconds": round(time.time() - start, 1), "steps": step, "images_seen": step * args.batch_size}


@torch.no_grad()
def evaluate(standin: torch.nn.Module, label_map: torch.Tensor, data: PretrainingData, device: str) -> dict[str, dict]:
    """Accuracy on each validation slice: on the stand-in's pretraining labels of that dataset (the
    task it was trained on) and, for CLIP, zero-shot on the dataset's own 10 class names (where the
    VL expert's text-initialised head starts)."""
    standin.eval()
    results = {}
    for dataset, own in (("fashion_mnist", slice(0, 10)), ("cifar10", slice(10, 20))):
        images, labels = data.val[dataset]
        own_labels = label_map[own].unique()  # the pretraining labels of this dataset's classes
        logits = torch.cat([standin(chunk.to(device)).cpu() for chunk in images.split(500)])
        predicted = own_labels[logits[:, own_labels].argmax(1)]
        results[dataset] = {"val_images": len(labels), "pretraining_labels": len(own_labels),
                            "accuracy_pretraining_labels": round(float((predicted == label_map[labels]).float().mean()), 4)}
        if isinstance(standin, ClipStandin):
            captions = standin.tokenize(data.class_names[own]).to(device)
            zero_shot = torch.cat([standin(chunk.to(device), captions).cpu() for chunk in images.split(500)])
            results[dataset]["zero_shot_own_10_classes"] = round(
                float((zero_shot.argmax(1) + own.start == labels).float().mean()), 4)
    return results


def save_half(weights: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().to(torch.float16).contiguous().cpu() for k, v in weights.items()}, str(path))


# ------------------------------------------------------------------------------------- card


def backbone_block(kind: str, out_dir: str) -> dict:
    if kind == "visual":
        return {"name": VIT_NAME, "pretrained": False, "checkpoint_path": f"{out_dir}/{VIT_FILE}",
                "model_kwargs": dict(VIT_KWARGS)}
    return {"pretrained": None, "checkpoint_path": f"{out_dir}/{CLIP_FILE}", "model_kwargs": CLIP_KWARGS}


def model_card(report: dict) -> str:
    r = report
    s = r["recipe"]

    def merges(key: str) -> str:
        return "; ".join(f"\"{label}\" = {' + '.join(members)}" for label, members in r[key]["pretraining_labels"].items()
                         if len(members) > 1)

    accuracy = []
    for key, label in (("vit", "ViT"), ("clip", "CLIP")):
        for dataset, name in (("fashion_mnist", "Fashion-MNIST"), ("cifar10", "CIFAR-10")):
            a = r[key]["val_accuracy"][dataset]
            zero_shot = f"{100 * a['zero_shot_own_10_classes']:.1f}%" if "zero_shot_own_10_classes" in a else "-"
            accuracy.append(f"| {label} | {name} | {a['val_images']} | {a['pretraining_labels']} | "
                            f"{100 * a['accuracy_pretraining_labels']:.1f}% | {zero_shot} |")
    return template(
        "standins", "card", vit_merges=merges("vit"), clip_merges=merges("clip"), vit_file=VIT_FILE, vit_name=VIT_NAME,
        vit_backbone=f"{r['vit']['parameters']['backbone']:,}",
        vit_head=f"{r['vit']['parameters']['classification_head']:,}",
        clip_file=CLIP_FILE, clip_image=f"{r['clip']['parameters']['image_tower']:,}",
        clip_text=f"{r['clip']['parameters']['text_tower_and_logit_scale']:,}",
        class_text=TEXT_TEMPLATE.format("{class}"),
        accuracy_rows="\n".join(accuracy), archive=s["cifar_archive"], seed=s["seed"], fmnist_val=FMNIST_VAL_PER_CLASS,
        fmnist_pool=FMNIST_POOL_PER_CLASS, cifar_val=CIFAR_VAL_PER_CLASS, cifar_test=CIFAR_TEST_PER_CLASS,
        cifar_pool=CIFAR_POOL_PER_CLASS, fmnist_images=f"{r['data']['pretraining_images']['fashion_mnist']:,}",
        cifar_images=f"{r['data']['pretraining_images']['cifar10']:,}", fmnist_epoch=s["fmnist_per_class_per_epoch"],
        cifar_epoch=s["cifar_per_class_per_epoch"], batch=s["batch_size"], epochs=s["epochs"],
        vit_labels=len(r["vit"]["pretraining_labels"]), vit_kwargs=json.dumps(VIT_KWARGS),
        clip_kwargs=json.dumps(CLIP_KWARGS), clip_labels=len(r["clip"]["pretraining_labels"]),
        label_text=TEXT_TEMPLATE.format("{label}"), lr=s["lr"], weight_decay=s["weight_decay"], device=s["device"],
        threads=s["threads"], torch=s["torch"], timm=s["timm"], open_clip=s["open_clip"],
        vit_minutes=f"{r['vit']['train_seconds'] / 60:.1f}", clip_minutes=f"{r['clip']['train_seconds'] / 60:.1f}",
        visual_yaml="\n".join(_backbone_yaml(r["backbone_blocks"]["visual"])),
        vl_yaml="\n".join(_backbone_yaml(r["backbone_blocks"]["vl"]))) + "\n"


def _backbone_yaml(block: dict) -> list[str]:
    import yaml

    return yaml.safe_dump({"backbone": block}, sort_keys=False, default_flow_style=None, width=200).splitlines()


# ------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archive", default=DEFAULT_ARCHIVE,
                   help="CIFAR-10 training JPEGs (train/<class>/*.jpg) as .tar.gz; relative paths are relative to the repository root")
    p.add_argument("--fashion-mnist-root", default=None,
                   help="folder of the Fashion-MNIST IDX files (default: FashionMNISTSource's)")
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder, relative to the repository root unless absolute")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--fmnist-per-class", type=int, default=200, help="Fashion-MNIST images of each class per epoch")
    p.add_argument("--cifar-per-class", type=int, default=1200, help="CIFAR-10 images of each class per epoch")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=SEED, help="seed of the held-out slices and of training")
    p.add_argument("--only", choices=("vit", "clip"), default=None,
                   help="train one stand-in only (keeps the other's figures in standins.json); then --card")
    p.add_argument("--card", action="store_true", help="only rewrite MODEL_CARD.md from standins.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import open_clip
    import timm

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.card:
        out = Path(args.out) if Path(args.out).is_absolute() else REPO / args.out
        (out / "MODEL_CARD.md").write_text(model_card(json.loads((out / "standins.json").read_text())))
        return
    archive = Path(args.archive) if Path(args.archive).is_absolute() else REPO / args.archive
    out = Path(args.out) if Path(args.out).is_absolute() else REPO / args.out
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    begin = time.time()
    log(f"reading Fashion-MNIST and {archive}")
    data = PretrainingData(args.fashion_mnist_root, archive, args.seed)
    (out / "heldout_slices.json").write_text(json.dumps(data.slices, indent=1) + "\n")
    log(f"pretraining pools: {data.pretraining_counts()}")

    out_rel = args.out if not Path(args.out).is_absolute() else str(out)
    report = {
        "recipe": {"seed": args.seed, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                   "weight_decay": args.weight_decay, "fmnist_per_class_per_epoch": args.fmnist_per_class,
                   "cifar_per_class_per_epoch": args.cifar_per_class, "device": args.device, "threads": args.threads,
                   "cifar_archive": archive.name, "torch": torch.__version__, "timm": timm.__version__,
                   "open_clip": open_clip.__version__, "machine": platform.machine()},
        "data": {"pretraining_images": data.pretraining_counts(), "classes": data.class_names},
        "backbone_blocks": {"visual": backbone_block("visual", out_rel), "vl": backbone_block("vl", out_rel)},
    }
    builders = {"vit": (ViTStandin, VISUAL_LABELS, VIT_FILE), "clip": (ClipStandin, CLIP_LABELS, CLIP_FILE)}
    for key, (build, merges, file_name) in builders.items():
        if args.only not in (None, key):
            continue
        label_names, mapping = pretraining_labels(data.class_names, merges)
        label_map = torch.tensor(mapping)
        torch.manual_seed(args.seed)
        standin = build(label_names)
        log(f"{key}: {param_counts(standin)}; {len(label_names)} pretraining labels")
        stats = train(standin, label_map, data, args, log)
        round_to_half(standin)
        stats["pretraining_labels"] = {name: [c for c, m in zip(data.class_names, mapping) if m == i]
                                       for i, name in enumerate(label_names)}
        stats["val_accuracy"] = evaluate(standin, label_map, data, args.device)
        stats["parameters"] = param_counts(standin)
        # The ViT's head stays in its file: the backbone loader skips it, the tests read it.
        save_half(standin.model.state_dict(), out / file_name)
        stats["file_bytes"] = (out / file_name).stat().st_size
        report[key] = stats
        log(f"{key}: {json.dumps(stats['val_accuracy'])}")
    report["wall_seconds"] = round(time.time() - begin, 1)
    if args.only is not None and (out / "standins.json").is_file():
        # One stand-in per process (two side by side): keep the other's figures when the recipe is the same.
        earlier = json.loads((out / "standins.json").read_text())
        same = {k: v for k, v in earlier.get("recipe", {}).items() if k != "threads"} == \
            {k: v for k, v in report["recipe"].items() if k != "threads"}
        if same:
            report |= {k: earlier[k] for k in ("vit", "clip") if k in earlier and k != args.only}
            report["wall_seconds"] = max(report["wall_seconds"], earlier.get("wall_seconds", 0))
    (out / "standins.json").write_text(json.dumps(report, indent=1) + "\n")
    if args.only is None:
        (out / "MODEL_CARD.md").write_text(model_card(report))
    log(f"done in {report['wall_seconds'] / 60:.1f} min: {out}")


if __name__ == "__main__":
    main()
