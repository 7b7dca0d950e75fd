"""The pretrained stand-in experts of weights/standins/ (benchmarks/pretrain_standins.py).

They load through the project's real local-weights path and still reach their model card's
accuracy on the held-out validation slices; they were pretrained on none of the images a
long-tailed task draws (its val, test and training pool); trained briefly on Fashion-MNIST-LT
they beat their own starting row, and A-GCL with class-balanced sampling lifts few-shot accuracy
over CE with instance sampling.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from lpt_lightning.callbacks import default_callbacks
from lpt_lightning.data import (
    FASHION_MNIST_CLASSES,
    ClassAwareSampler,
    FashionMNISTSource,
    ImageFolderSource,
    InstanceSampler,
    LongTailDataModule,
    build_eval_transform,
    holdout_slices,
    target_slices,
)
from lpt_lightning.data_facts import connect
from lpt_lightning.losses import AGCLLoss, LogitAdjustedCE
from lpt_lightning.metrics import SplitAccuracy
from lpt_lightning.models.backbones import BackboneSpec
from lpt_lightning.safe_load import read_state_dict
from lpt_lightning.models.expert import ExpertSpec
from lpt_lightning.models.heads import CosineHead
from lpt_lightning.phases import AdaptPhase, OptimSpec

REPO = Path(__file__).resolve().parents[1]
STANDINS = REPO / "weights" / "standins"
CARD = json.loads((STANDINS / "standins.json").read_text())
SLICES = json.loads((STANDINS / "heldout_slices.json").read_text())
CIFAR_ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-train-jpeg.tar.gz"  # CI places shared/ beside the clone
FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(not FMNIST.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
needs_cifar = pytest.mark.skipif(not CIFAR_ARCHIVE.is_file(), reason=f"{CIFAR_ARCHIVE.name} not beside the clone")
EXPERT_KIND = {"vit": "visual", "clip": "vl"}


def backbone_spec(standin: str) -> BackboneSpec:
    """The documented backbone block, checkpoint path relative to the repository root."""
    block = dict(CARD["backbone_blocks"][EXPERT_KIND[standin]])
    block["checkpoint_path"] = str(REPO / block["checkpoint_path"])
    return BackboneSpec(**block)


def bare_expert(standin: str, class_names: list[str]) -> AdaptPhase:
    """A phase-1 expert without prompts, adapters or dropout: the loaded backbone as it is."""
    spec = ExpertSpec(kind=EXPERT_KIND[standin], backbone=backbone_spec(standin), prompt_length=0, adapters=False,
                      head_dropout=0.0)
    return AdaptPhase(expert=spec, num_classes=len(class_names), class_names=class_names).eval()


@pytest.fixture(scope="module")
def fmnist_val() -> tuple[torch.Tensor, torch.Tensor]:
    """The Fashion-MNIST val slice held out from pretraining, with the pipeline's eval transform."""
    splits = FashionMNISTSource(val_per_class=SLICES["fashion_mnist"]["val_per_class"], seed=SLICES["seed"]).load()
    transform = build_eval_transform(32)
    images = torch.stack([transform(Image.fromarray(splits.images[i]).convert("RGB")) for i in splits.val.items])
    return images, torch.from_numpy(splits.val.labels)


@pytest.fixture(scope="module")
def cifar_archive() -> dict[str, bytes | None]:
    """Every member name of the archive; the JPEG bytes of the val slice's images."""
    wanted = set(SLICES["cifar10"]["val_files"])
    with tarfile.open(CIFAR_ARCHIVE) as tar:
        return {m.name: tar.extractfile(m).read() if m.name in wanted else None for m in tar.getmembers() if m.isfile()}


@pytest.fixture(scope="module")
def cifar_val(cifar_archive) -> tuple[torch.Tensor, torch.Tensor]:
    """The CIFAR-10 val slice held out from pretraining, with the pipeline's eval transform."""
    info = SLICES["cifar10"]
    transform = build_eval_transform(32)
    images = torch.stack([transform(Image.open(io.BytesIO(cifar_archive[n])).convert("RGB")) for n in info["val_files"]])
    labels = torch.tensor([info["classes"].index(Path(n).parts[1]) for n in info["val_files"]])
    return images, labels


def test_weights_are_small_and_the_configs_use_them():
    blocks = CARD["backbone_blocks"]
    assert sum((REPO / block["checkpoint_path"]).stat().st_size for block in blocks.values()) < 10 * 2**20
    for kind, block in blocks.items():
        # configs/standins/<kind>_expert.yaml names this piece as its expert
        expert = yaml.safe_load((REPO / "configs" / "expert" / f"standin_{kind}.yaml").read_text())
        assert expert["backbone"] == block


# ------------------------------------------------------------------------ held-out slices


def image_folder_order(members: list[str]) -> tuple[list[str], np.ndarray]:
    """Archive members in ImageFolderSource's order (classes, then files, by name) and labels."""
    names = sorted(members)
    classes = sorted({Path(n).parts[1] for n in names})
    return names, np.array([classes.index(Path(n).parts[1]) for n in names])


def test_archive_listing_order_is_image_folder_order(tmp_path):
    root = tmp_path / "train"
    for c in ("cat", "airplane", "dog"):
        (root / c).mkdir(parents=True)
        for i in (3, 10, 1, 7, 22):
            Image.new("RGB", (4, 4)).save(root / c / f"{c}_{i}.jpg")
    archive = tmp_path / "train.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="train")
    with tarfile.open(archive) as tar:
        names, labels = image_folder_order([m.name for m in tar.getmembers() if m.isfile()])
    val, test, _ = holdout_slices(labels, 1, 2, seed=0)
    splits = ImageFolderSource(str(root), val_per_class=1, test_per_class=2, seed=0).load()
    for split, held in ((splits.val, val), (splits.test, test)):
        assert [str(Path(p).relative_to(tmp_path)) for p in split.items] == [names[i] for i in held]


@needs_cifar
def test_cifar10_slices_are_reproducible(cifar_archive):
    info = SLICES["cifar10"]
    names, labels = image_folder_order(list(cifar_archive))
    val, test, pool, rest = target_slices(labels, info["val_per_class"], info["test_per_class"],
                                          info["train_pool_per_class"], SLICES["seed"])
    assert [names[i] for i in val] == info["val_files"]
    assert [names[i] for i in test] == info["test_files"]
    assert [names[i] for i in pool] == info["pool_files"]
    # pretraining saw only the rest: no val, test or long-tail pool image
    assert len(rest) == CARD["data"]["pretraining_images"]["cifar10"] == 50_000 - len(val) - len(test) - len(pool)
    assert not set(info["val_files"]) & set(info["test_files"])


@needs_fmnist
def test_fashion_mnist_val_slice_and_pool_are_the_sources():
    info = SLICES["fashion_mnist"]
    splits = FashionMNISTSource(val_per_class=info["val_per_class"], imbalance_ratio=100, max_per_class=1000,
                                train_pool_per_class=info["train_pool_per_class"], seed=SLICES["seed"]).load()
    assert list(splits.val.items) == info["val_indices"]
    assert set(int(i) for i in splits.train.items) <= set(info["pool_indices"])
    assert CARD["data"]["pretraining_images"]["fashion_mnist"] == \
        60_000 - len(info["val_indices"]) - len(info["pool_indices"])


# ------------------------------------------------------------------------ accuracy through the real path


def card_accuracy(standin: str, dataset: str, images: torch.Tensor, labels: torch.Tensor) -> float:
    """What the card reports: the ViT's trained head on its own (coarser) pretraining labels of the
    dataset, read from the weights file; CLIP zero-shot over the dataset's 10 class names (the VL
    expert's text-initialised head)."""
    names = list(FASHION_MNIST_CLASSES if dataset == "fashion_mnist" else SLICES["cifar10"]["classes"])
    phase = bare_expert(standin, names)
    with torch.no_grad():
        if standin == "clip":
            logits = torch.cat([phase.expert(chunk).logits for chunk in images.split(250)])
            return float((logits.argmax(1) == labels).float().mean())
        label_of = {cls: i for i, members in enumerate(CARD["vit"]["pretraining_labels"].values()) for cls in members}
        targets = torch.tensor([label_of[names[int(y)]] for y in labels])
        own = torch.tensor(sorted({label_of[n] for n in names}))
        head = read_state_dict(backbone_spec("vit").checkpoint_path)
        features = torch.cat([phase.expert(chunk).features for chunk in images.split(250)])
        logits = features @ head["head.weight"][own].float().t() + head["head.bias"][own].float()
        return float((own[logits.argmax(1)] == targets).float().mean())


CARD_KEY = {"vit": "accuracy_pretraining_labels", "clip": "zero_shot_own_10_classes"}


@needs_fmnist
@pytest.mark.parametrize("standin", ["vit", "clip"])
def test_fashion_mnist_accuracy_matches_card(standin, fmnist_val):
    measured = card_accuracy(standin, "fashion_mnist", *fmnist_val)
    # The same images as the card: only float rounding in the wrappers' block order may flip a few.
    assert measured == pytest.approx(CARD[standin]["val_accuracy"]["fashion_mnist"][CARD_KEY[standin]], abs=0.01)


@needs_cifar
@pytest.mark.parametrize("standin", ["vit", "clip"])
def test_cifar10_accuracy_matches_card(standin, cifar_val):
    measured = card_accuracy(standin, "cifar10", *cifar_val)
    assert measured == pytest.approx(CARD[standin]["val_accuracy"]["cifar10"][CARD_KEY[standin]], abs=0.01)


# ------------------------------------------------------------------------ learning regression (issue 11, part 4)

LT_SOURCE = {"imbalance_ratio": 100, "max_per_class": 300, "val_per_class": 100, "max_test_per_class": 100,
             "train_pool_per_class": 1000, "seed": 0}


def short_phase1(tmp_path, kind: str, sampling: str = "dual", loss_sign: float = 1.0) -> dict[str, dict[str, float]]:
    """The real phase 1 on a stand-in (prompts, adapters, the expert's own head start, A-GCL), a
    short run on Fashion-MNIST-LT; the test rows before ("start") and after ("trained") training."""
    L.seed_everything(0)
    source = FashionMNISTSource(**(LT_SOURCE | {"max_per_class": 100, "max_test_per_class": 50}))
    dm = LongTailDataModule(source, batch_size=32, num_workers=0, seed=0, augment=False, sampling=sampling)
    expert = yaml.safe_load((REPO / "configs" / "expert" / f"standin_{kind}.yaml").read_text())
    expert["backbone"] = backbone_spec("vit" if kind == "visual" else "clip")
    phase = AdaptPhase(expert=ExpertSpec(**expert), num_classes=dm.num_classes, class_names=dm.class_names,
                       optim=OptimSpec(base_lr=0.5, warmup_epochs=0))
    if loss_sign != 1.0:  # a regression the test must catch: the loss's gradient pointing the wrong way
        original = phase.stream_loss
        phase.stream_loss = lambda *a: {k: loss_sign * v for k, v in original(*a).items()}
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=2, precision="32-true", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, limit_train_batches=15, default_root_dir=tmp_path,
                        callbacks=default_callbacks())
    connect(phase, dm)
    trainer.fit(phase, datamodule=dm)
    trained = {k: v.clone() for k, v in phase.state_dict().items()}
    phase.load_start_state()
    trainer.test(phase, datamodule=dm, verbose=False)
    start = phase.results["test"]
    phase.load_state_dict(trained, strict=False)
    trainer.test(phase, datamodule=dm, verbose=False)
    return {"start": start, "trained": phase.results["test"]}


def beats_its_start(rows: dict[str, dict[str, float]]) -> bool:
    """The learning claim: overall clearly above the no-training row, few-shot not below it."""
    start, trained = rows["start"], rows["trained"]
    return trained["acc"] >= start["acc"] + 5 and trained["acc_few"] >= start["acc_few"]


@needs_fmnist
@pytest.mark.parametrize("kind", ["vl", "visual"])
def test_short_training_beats_its_own_start(tmp_path, kind):
    """Phase 1 from the stand-in's own start must end above it: the VL expert from its zero-shot
    text head (the regression where every trained row ended below its start fails here), the
    visual expert from the random head of configs/expert/standin_visual.yaml. (From class means,
    the visual expert's short phase 1 only matches its start: docs/results.md.)"""
    rows = short_phase1(tmp_path, kind)
    assert beats_its_start(rows), rows


@needs_fmnist
def test_the_learning_check_fails_on_a_flipped_loss_or_a_broken_sampler(tmp_path):
    """The check above is not vacuous: gradient ascent, or a class-balanced stream that samples
    like the instance stream, fail it."""
    assert not beats_its_start(short_phase1(tmp_path / "flipped", "vl", loss_sign=-1.0))
    assert not beats_its_start(short_phase1(tmp_path / "instance", "vl", sampling="instance"))


@pytest.fixture(scope="module")
def lt_features() -> dict[str, torch.Tensor]:
    """Frozen visual stand-in features of Fashion-MNIST-LT (IR 100) train and test images."""
    dm = LongTailDataModule(FashionMNISTSource(**LT_SOURCE), batch_size=32, eval_batch_size=250, num_workers=0,
                            img_size=32, seed=0)
    phase = bare_expert("vit", dm.class_names)
    out = {"counts": dm.train_class_counts}
    with torch.no_grad():
        for split in ("train", "test"):
            batches = list(dm.split_dataloader(split))
            out[split] = torch.cat([phase.expert(b["image"]).features for b in batches])
            out[f"{split}_labels"] = torch.cat([b["label"] for b in batches])
    return out


def train_head(features: torch.Tensor, labels: torch.Tensor, loss: torch.nn.Module, sampler, epochs: int = 30) -> CosineHead:
    torch.manual_seed(0)
    head = CosineHead(features.shape[1], 10, dropout=0.0)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    loss.train()
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in torch.tensor(list(sampler)).split(32):
            value = loss(head(features[batch]), labels[batch])
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
    return head.eval()


def split_accuracy(head: CosineHead, data: dict[str, torch.Tensor]) -> dict[str, float]:
    metric = SplitAccuracy(data["counts"])
    with torch.no_grad():
        metric.update(head(data["test"]), data["test_labels"])
    return {k: float(v) for k, v in metric.compute().items() if k != "per_class"}


@needs_fmnist
def test_agcl_with_class_balanced_sampling_lifts_few_shot(lt_features):
    """Same features, head, optimiser and budget; only the loss and the sampler differ."""
    data, labels, counts = lt_features["train"], lt_features["train_labels"], lt_features["counts"]
    plain = split_accuracy(train_head(data, labels, LogitAdjustedCE(counts, tau=0.0), InstanceSampler(labels)),
                           lt_features)
    agcl = split_accuracy(train_head(data, labels, AGCLLoss(counts, gamma_pos=0.0, gamma_neg=4.0),
                                     ClassAwareSampler(labels)), lt_features)
    assert plain["acc"] > 45 and agcl["acc"] > 45  # percent; measured 59 and 69, chance 10
    # Measured: +23 points; A-GCL over an instance sampler (a broken class-aware one) gives +6.
    assert agcl["acc_few"] > plain["acc_few"] + 12, (plain, agcl)
