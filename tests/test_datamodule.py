"""LongTailDataModule, dataset, transforms: loaders, batches, DDP-style sharding, errors."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchdata.stateful_dataloader import StatefulDataLoader

from lpt_lightning.data import (
    AnnotationListSource,
    ClassAwareSampler,
    FashionMNISTSource,
    ImageFolderSource,
    InstanceSampler,
    LongTailDataModule,
    LongTailImageDataset,
    ShardedEvalSampler,
    Split,
    StreamBatchSampler,
    UndecodedImages,
    build_eval_transform,
    build_train_transform,
    collate_skipping,
    eval_resize_size,
    verify_images,
)
from lpt_lightning.errors import ConfigError, DataFormatError

COUNTS = {"a": 8, "b": 4, "c": 2, "d": 2}  # 16 train images, imbalance 4


@pytest.fixture()
def folder(tmp_path) -> Path:
    root = tmp_path / "imgs"
    for c, (name, n) in enumerate(COUNTS.items()):
        (root / name).mkdir(parents=True)
        for i in range(n + 1):  # +1 per class for a 1-per-class val slice
            Image.new("RGB", (10, 8), (60 * c, 20 * i, 100)).save(root / name / f"{i}.png")
    return root


def _dm(folder, **kw) -> LongTailDataModule:
    src = ImageFolderSource(root=str(folder), val_per_class=1, seed=0, name="tiny")
    args = dict(batch_size=4, num_workers=0, img_size=8, pin_memory=False)
    args.update(kw)
    return LongTailDataModule(source=src, **args)


def _fake_trainer(world_size=1, rank=0):
    return SimpleNamespace(world_size=world_size, global_rank=rank)


# ------------------------------------------------------------------------------ transforms / dataset


def test_transforms_sizes_and_range():
    img = Image.new("RGB", (50, 30), (255, 128, 0))
    x = build_train_transform(16)(img)
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8 and type(x) is torch.Tensor
    y = build_eval_transform(16)(img)
    assert y.shape == (3, 16, 16) and y.dtype == torch.uint8
    assert y[:, 0, 0].tolist() == [255, 128, 0]  # no normalisation, no float conversion
    assert eval_resize_size(224) == 256 and eval_resize_size(32) == 37
    with pytest.raises(ConfigError):
        build_eval_transform(0)


def test_dataset_files_and_arrays(tmp_path):
    gray = tmp_path / "g.png"
    Image.new("L", (5, 5), 77).save(gray)
    ds = LongTailImageDataset(Split([str(gray)], np.array([3])), build_eval_transform(4))
    item = ds[0]
    assert item["image"].shape == (3, 4, 4) and item["label"].dtype == torch.int64 and item["label"] == 3
    assert item["index"] == 0
    assert torch.equal(item["image"], torch.full((3, 4, 4), 77, dtype=torch.uint8))  # L -> 3 equal RGB channels
    images = np.stack([np.full((6, 6), 10, np.uint8), np.full((6, 6), 200, np.uint8)])
    ds2 = LongTailImageDataset(Split([1, 0], np.array([0, 1])), build_eval_transform(4), images=images)
    assert torch.equal(ds2[0]["image"], torch.full((3, 4, 4), 200, dtype=torch.uint8))
    assert ds2[1]["index"] == 1
    with pytest.raises(DataFormatError, match="need the in-memory images array"):
        LongTailImageDataset(Split([0], np.array([0])), None)


def test_unreadable_image_raises_or_is_skipped(tmp_path):
    good, bad = tmp_path / "good.png", tmp_path / "corrupt.jpg"
    Image.new("RGB", (4, 4)).save(good)
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    split = Split([str(good), str(bad), str(tmp_path / "missing.png")], np.array([0, 1, 1]), origin="list.txt")
    ds = LongTailImageDataset(split, build_eval_transform(4))
    with pytest.raises(DataFormatError, match=r"cannot read image .*corrupt\.jpg \(listed in list\.txt\)"):
        ds[1]
    with pytest.raises(DataFormatError, match="missing.png"):
        ds[2]
    skipping = LongTailImageDataset(split, build_eval_transform(4), skip_unreadable=True)
    assert skipping[1] is None and skipping[2] is None
    batch = collate_skipping([skipping[i] for i in range(3)])
    assert batch["num_skipped"].item() == 2 and batch["image"].shape == (1, 3, 4, 4)
    assert batch["index"].tolist() == [0]
    empty = collate_skipping([None, None])
    assert empty["num_skipped"].item() == 2 and empty["label"].numel() == 0


def test_verify_images_reports_each_bad_file_and_its_line(tmp_path):
    present = tmp_path / "ok.png"
    Image.new("RGB", (4, 4)).save(present)
    items = [str(present)] + [str(tmp_path / f"gone{i}.jpg") for i in range(7)]
    split = Split(items, np.zeros(8, dtype=np.int64), origin="/data/Places_LT_train.txt", positions=np.arange(1, 9))
    with pytest.raises(DataFormatError) as err:
        verify_images(split)
    msg = str(err.value)
    assert "7 of 8 checked images listed in /data/Places_LT_train.txt cannot be read" in msg
    assert "gone0.jpg (/data/Places_LT_train.txt, line 2): does not exist" in msg
    assert "gone4.jpg" in msg and "gone5.jpg" not in msg and "and 2 more" in msg and "data.skip_unreadable" in msg
    assert verify_images(Split([str(present)], np.array([0]))) == 1
    assert verify_images(Split([0, 1], np.array([0, 1]))) == 0  # in-memory arrays: nothing to check
    assert verify_images(Split([str(present)] * 50, np.zeros(50, dtype=np.int64)), sample=5) <= 5
    assert verify_images(split, "off") == 0


def test_verify_images_modes_and_processes(tmp_path):
    """header: existence, a parsable header and, for JPEG and PNG, the end marker (finds files cut
    off); full: every pixel. The result is the same in one process or several."""
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    good, png = tmp_path / "good.jpg", tmp_path / "good.png"
    Image.fromarray(pixels).save(good)
    Image.fromarray(pixels).save(png)
    (tmp_path / "cut.jpg").write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    (tmp_path / "cut.png").write_bytes(png.read_bytes()[:png.stat().st_size // 2])
    (tmp_path / "text.jpg").write_text("not an image")
    # Data after the end marker (a camera's trailer): no marker at the end, but every pixel decodes.
    (tmp_path / "trailer.jpg").write_bytes(good.read_bytes() + b"\0" * 4096)
    # Damage inside the compressed data, end marker intact: only a full decode finds it.
    data = bytearray(png.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    (tmp_path / "garbled.png").write_bytes(bytes(data))
    names = ["cut.jpg", "cut.png", "text.jpg", "trailer.jpg", "garbled.png"]
    items = [str(good), str(png)] * 300 + [str(tmp_path / n) for n in names]
    split = Split(items, np.zeros(len(items), dtype=np.int64), origin="list.txt", positions=np.arange(1, 606))
    for workers in (1, 2):
        with pytest.raises(DataFormatError) as err:
            verify_images(split, "header", workers=workers)
        message = str(err.value)
        assert "3 of 605" in message, message
        assert "cut.jpg (list.txt, line 601): OSError: image file is truncated" in message
        assert "cut.png (list.txt, line 602): " in message and "text.jpg (list.txt, line 603)" in message
        with pytest.raises(DataFormatError) as err:
            verify_images(split, "full", workers=workers)
        assert "4 of 605" in str(err.value) and "garbled.png (list.txt, line 605)" in str(err.value)
        assert "trailer.jpg" not in str(err.value)


# ------------------------------------------------------------------------------ DataModule


def test_metadata_available_right_after_init(folder):
    dm = _dm(folder)
    assert dm.num_classes == 4 and dm.class_names == ["a", "b", "c", "d"]
    assert dm.train_class_counts.tolist() == [8, 4, 2, 2] and dm.train_class_counts.dtype == torch.int64
    assert dm.splits is dm.splits  # parsed once, cached
    assert dm.summary() == (
        "tiny: 16 train images, 4 classes, max 8 / min 2 per class (imbalance ratio 4.0); val 4; no test split"
    )


def _stream(loader, name):
    """One stream's batches of the one training loader, in step order."""
    return [batch[name] for batch in loader]


def test_dual_sampling_batches(folder):
    dm = _dm(folder)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, StatefulDataLoader) and isinstance(loader.sampler, StreamBatchSampler)
    assert isinstance(loader.sampler.streams["cb"], ClassAwareSampler)
    assert isinstance(loader.sampler.streams["ib"], InstanceSampler)
    assert len(loader) == 4  # 16 samples / batch 4, drop_last
    steps = list(loader)
    assert len(steps) == 4 and all(set(step) == {"cb", "ib"} for step in steps)
    cb_batches, ib_batches = [s["cb"] for s in steps], [s["ib"] for s in steps]
    for cb, ib in zip(cb_batches, ib_batches):
        for batch in (cb, ib):
            assert set(batch) == {"image", "label", "index"}
            assert batch["image"].shape == (4, 3, 8, 8) and batch["image"].dtype == torch.uint8
            assert batch["label"].dtype == torch.int64 and batch["index"].dtype == torch.int64
            train = dm.splits.train
            assert batch["label"].tolist() == train.labels[batch["index"].numpy()].tolist()
        assert len(set(cb["label"].tolist())) == 1  # 4 images per class visit = one class per batch
    # one epoch of the class-aware stream visits every class equally often
    cb_labels = torch.cat([b["label"] for b in cb_batches])
    assert torch.bincount(cb_labels, minlength=4).tolist() == [4, 4, 4, 4]
    assert sorted(torch.cat([b["index"] for b in ib_batches]).tolist()) == list(range(16))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_one_loader_yields_the_draws_of_each_streams_sampler(folder, num_workers):
    """Step k holds batch k of every stream's own sampler: the draws (and augmentations) the two
    loaders of one stream each used to give."""
    dm = _dm(folder, num_workers=num_workers)
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(2)
    steps = list(loader)
    dataset = dm._datasets["train:train"]
    labels = dm.splits.train.labels
    for kind, make in (("cb", lambda: ClassAwareSampler(labels, images_per_class=4, seed=0, draw_keys=True)),
                       ("ib", lambda: InstanceSampler(labels, seed=0 + 1_000_003, draw_keys=True))):
        sampler = make()
        sampler.set_epoch(2)
        draws = list(sampler)
        for step, batch in enumerate(steps):
            expected = [dataset[draw] for draw in draws[4 * step:4 * step + 4]]
            assert batch[kind]["index"].tolist() == [e["index"] for e in expected]
            assert torch.equal(batch[kind]["image"], torch.stack([e["image"] for e in expected]))


@pytest.mark.parametrize("sampling, keys", [("instance", {"ib"}), ("class_aware", {"cb"}), ("square_root", {"sqrt"})])
def test_single_stream_sampling(folder, sampling, keys):
    dm = _dm(folder, sampling=sampling)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert set(loader.sampler.streams) == keys
    batch = next(iter(loader))
    assert set(batch) == keys and batch[next(iter(keys))]["image"].shape == (4, 3, 8, 8)


def test_samplers_take_ranks_from_trainer(folder):
    shards = []
    for rank in range(2):
        dm = _dm(folder)
        dm.trainer = _fake_trainer(world_size=2, rank=rank)
        loader = dm.train_dataloader()
        sampler = loader.sampler.streams["cb"]
        assert (sampler.num_replicas, sampler.rank) == (2, rank) and len(sampler) == 8
        assert (loader.sampler.num_replicas, loader.sampler.rank, len(loader)) == (2, rank, 2)
        shards.append([draw.index for draw in sampler])
    reference = ClassAwareSampler(_dm(folder).splits.train.labels, images_per_class=4, seed=0)
    assert [shards[i % 2][i // 2] for i in range(16)] == reference.global_sequence().tolist()


def test_eval_loaders_cover_each_sample_once_across_ranks(folder):
    seen = {"val": [], "test": []}
    for rank in range(2):
        dm = _dm(folder, eval_batch_size=3)
        dm.trainer = _fake_trainer(world_size=2, rank=rank)
        with pytest.warns(UserWarning, match="no test split: using the val split for test"):
            dm.setup("test")
        val, test = dm.val_dataloader(), dm.test_dataloader()
        assert isinstance(val.sampler, ShardedEvalSampler) and val.batch_size == 3 and not val.drop_last
        assert len(val.sampler) == 2
        for name, loader in (("val", val), ("test", test)):
            for batch in loader:
                assert batch["image"].shape[1:] == (3, 8, 8)
                seen[name].extend(batch["index"].tolist())
    assert sorted(seen["val"]) == list(range(4)) and sorted(seen["test"]) == list(range(4))


def test_img_size_from_model_or_error(folder):
    from lpt_lightning.data_facts import connect

    dm = _dm(folder, img_size=None)
    dm.trainer = _fake_trainer()
    with pytest.raises(ConfigError, match="set data.img_size"):
        dm.setup("fit")
    connect(SimpleNamespace(img_size=12), dm)  # what lpt does with the model it built
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["cb"]["image"].shape == (4, 3, 12, 12)


def test_batch_size_larger_than_data(folder):
    dm = _dm(folder, batch_size=17)
    with pytest.raises(ConfigError, match="batch_size=17 exceeds the 16 training samples per device"):
        dm.train_dataloader()


def test_invalid_config(folder):
    with pytest.raises(ConfigError, match="data.sampling"):
        _dm(folder, sampling="balanced")
    with pytest.raises(ConfigError, match="data.batch_size"):
        _dm(folder, batch_size=0)


def test_verify_images_before_training(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    Image.new("RGB", (4, 4)).save(root / "x.png")
    (root / "train.txt").write_text("x.png 0\nmissing/y.png 1\n")
    (root / "val.txt").write_text("x.png 0\n")
    src = AnnotationListSource(root=str(root), train_list="train.txt", val_list="val.txt")
    dm = LongTailDataModule(src, batch_size=1, num_workers=0, img_size=4, pin_memory=False)
    with pytest.raises(DataFormatError) as err:
        dm.setup("fit")
    assert "missing/y.png" in str(err.value) and "train.txt" in str(err.value)
    skip = LongTailDataModule(src, batch_size=2, num_workers=0, img_size=4, pin_memory=False, skip_unreadable=True)
    with pytest.warns(UserWarning, match="will be skipped"):
        skip.setup("fit")
    batch = next(iter(skip.train_dataloader()))["ib"]
    assert batch["num_skipped"].item() == 1 and batch["index"].tolist() == [0]
    unchecked = LongTailDataModule(src, batch_size=1, num_workers=0, img_size=4, verify_images="off")
    unchecked.setup("fit")  # no up-front check; the missing file would fail when loaded



def _list_dataset(root: Path, n: int, broken: tuple[int, ...] = ()) -> None:
    """``train.txt`` (n images, two classes) and ``val.txt`` (two images); ``bad.txt`` lists the
    training images with ``broken`` ones replaced by a garbage file."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (4, 4), (i, 0, 0)).save(root / f"{i}.png")
    (root / "garbage.png").write_bytes(b"not an image")
    (root / "train.txt").write_text("".join(f"{i}.png {i % 2}\n" for i in range(n)))
    (root / "val.txt").write_text("0.png 0\n1.png 1\n")
    (root / "bad.txt").write_text("".join(f"{'garbage' if i in broken else i}.png {i % 2}\n" for i in range(n)))


def test_verify_record_lets_later_runs_skip_the_check(tmp_path, monkeypatch):
    import PIL.Image

    opened = []
    real_open = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k))
    _list_dataset(tmp_path / "r", 6, broken=(3,))
    records = tmp_path / "verified"

    def setup(root=tmp_path / "r", train="train.txt", **kw):
        opened.clear()
        src = AnnotationListSource(root=str(root), train_list=train, val_list="val.txt")
        dm = LongTailDataModule(src, batch_size=1, num_workers=0, img_size=4, verify_record_dir=str(records), **kw)
        dm.setup("fit")
        return dm

    dm = setup()
    assert len(opened) == 8  # 6 training + 2 validation images
    assert sorted(p.name for p in records.iterdir()) == sorted(
        f"{s.digest()}-header.json" for s in (dm.splits.train, dm.splits.val))
    setup()
    assert opened == []  # a later phase on the same splits
    setup(verify_images="full")
    assert len(opened) == 8  # a stricter check is a check of its own
    with pytest.raises(DataFormatError, match="garbage.png"):
        setup(train="bad.txt")
    with pytest.raises(DataFormatError, match="garbage.png"):
        setup(train="bad.txt")  # a failed check is not recorded
    shutil.copytree(tmp_path / "r", tmp_path / "copy")
    setup(root=tmp_path / "copy")
    assert len(opened) == 8  # the same digest elsewhere: the copy's files are checked


@pytest.mark.slow  # ~30 s on 2 busy cores: two processes importing Lightning
@pytest.mark.ddp
def test_ranks_share_the_image_check_and_each_image_is_opened_once(tmp_path):
    import torch.multiprocessing as mp

    sys.path.insert(0, os.path.dirname(__file__))
    import ddp_verify_worker

    root = tmp_path / "data"
    _list_dataset(root, 9, broken=(5,))  # index 5: the share of rank 1
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(ddp_verify_worker.run, args=(2, f"file://{tmp_path / 'rendezvous'}", str(root), str(out)), nprocs=2,
             join=True)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    first = [p for r in ranks for p in r["phase1"]]
    expected = [str(root / f"{i}.png") for i in range(9)] + [str(root / "0.png"), str(root / "1.png")]
    assert sorted(first) == sorted(expected)  # train and val: every image opened once in total
    assert all(r["phase1"] for r in ranks)  # by both ranks
    assert [r["phase2"] for r in ranks] == [[], []]  # the next phase reads the record
    for r in ranks:  # both ranks fail, naming the file and its line, though only rank 1 opened it
        assert r["error"] is not None and "garbage.png" in r["error"] and "bad.txt, line 6" in r["error"]

def test_in_memory_fashion_mnist_source(tmp_path):
    root = tmp_path / "fm"
    root.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 20)):
        labels = np.tile(np.arange(10), n // 10).astype(np.uint8)
        images = rng.integers(0, 256, (n, 6, 6), dtype=np.uint8)
        for kind, arr in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
            data = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
            with gzip.open(root / f"{prefix}-{kind}.gz", "wb") as fh:
                fh.write(data)
    dm = LongTailDataModule(FashionMNISTSource(root=str(root), val_per_class=1), batch_size=5,
                            num_workers=0, img_size=4, pin_memory=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))["ib"]
    assert batch["image"].shape == (5, 3, 4, 4)
    assert all(torch.equal(im[0], im[1]) and torch.equal(im[1], im[2]) for im in batch["image"])  # gray -> RGB
    assert len(dm.val_dataloader().dataset) == 10 and len(dm.test_dataloader().dataset) == 20


def test_jsonargparse_builds_datamodule_from_class_path(folder):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(LongTailDataModule, "data")
    cfg = parser.parse_object({"data": {
        "source": {"class_path": "lpt_lightning.data.ImageFolderSource",
                   "init_args": {"root": str(folder), "val_per_class": 1}},
        "batch_size": 4, "num_workers": 0, "sampling": "class_aware", "img_size": 8,
    }})
    dm = parser.instantiate_classes(cfg).data
    assert isinstance(dm, LongTailDataModule) and isinstance(dm.source, ImageFolderSource)
    assert dm.num_classes == 4 and dm.sampling == "class_aware"


def test_lightning_trainer_keeps_samplers_and_sets_epoch(folder):
    import lightning as L

    class Probe(L.LightningModule):
        img_size = 8

        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 4)
            self.seen = []

        def training_step(self, batch, batch_idx):
            assert set(batch) == {"cb", "ib"} and batch["cb"]["image"].shape == batch["ib"]["image"].shape
            sampler = self.trainer.train_dataloader.sampler
            assert isinstance(sampler, StreamBatchSampler)  # Lightning kept it
            streams = sampler.streams
            assert isinstance(streams["cb"], ClassAwareSampler) and isinstance(streams["ib"], InstanceSampler)
            self.seen.append((self.current_epoch, sampler.epoch, streams["cb"].epoch, streams["ib"].epoch))
            return self.layer(batch["cb"]["image"].float().mean(dim=(2, 3))).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = Probe()
    dm = _dm(folder, img_size=8)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=2, limit_train_batches=2, limit_val_batches=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert model.seen == [(0, 0, 0, 0), (0, 0, 0, 0), (1, 1, 1, 1), (1, 1, 1, 1)]


# ------------------------------------------------------------------------------ one loader, uint8, device decoding


def test_transforms_match_torchvision_v1_to_tensor_bit_for_bit():
    """uint8 out of the workers, float on the device: x.float().div(255) is exactly what the former
    ToTensor pipeline gave, for the same random draws."""
    from torchvision import transforms as T

    rng = np.random.default_rng(0)
    for trial in range(20):
        h, w = (int(v) for v in rng.integers(20, 90, 2))
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        size = int(rng.integers(8, 40))
        r = eval_resize_size(size)
        v1_train = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor()])
        v1_eval = T.Compose([T.Resize((r, r)), T.CenterCrop(size), T.ToTensor()])
        for v1, ours in ((v1_train, build_train_transform(size)), (v1_eval, build_eval_transform(size))):
            torch.manual_seed(trial)
            expected = v1(img)
            torch.manual_seed(trial)
            assert torch.equal(ours(img).float().div(255), expected)


def test_training_uses_one_worker_pool(folder):
    """Dual sampling: num_workers processes in all, not one pool per stream."""
    import multiprocessing

    dm = _dm(folder, num_workers=2)
    dm.setup("fit")
    before = set(multiprocessing.active_children())
    steps = iter(dm.train_dataloader())
    batch = next(steps)
    assert len(set(multiprocessing.active_children()) - before) == 2
    assert batch["cb"]["image"].dtype == batch["ib"]["image"].dtype == torch.uint8
    del steps


@pytest.fixture()
def jpeg_folder(tmp_path) -> Path:
    """Photo-like JPEGs of several sizes (blurred noise), one PNG, for the device-decoding path."""
    rng = np.random.default_rng(1)
    root = tmp_path / "jpegs"
    for name, n in COUNTS.items():
        (root / name).mkdir(parents=True)
        for i in range(n + 1):
            h, w = (int(v) for v in rng.integers(30, 70, 2))
            small = Image.fromarray(rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8))
            img = small.resize((w, h), Image.BILINEAR)
            img.save(root / name / f"{i}.png") if (name, i) == ("a", 3) else img.save(root / name / f"{i}.jpg")
    return root


def _jpeg_dm(root, **kw) -> LongTailDataModule:
    src = ImageFolderSource(root=str(root), val_per_class=1, seed=0, name="jpegs")
    args = {"batch_size": 4, "num_workers": 0, "img_size": 16, "pin_memory": False}
    args.update(kw)
    dm = LongTailDataModule(source=src, **args)
    dm.setup("fit")
    return dm


def test_decoding_on_the_device_matches_the_worker_path(jpeg_folder):
    """On the CPU: the same images, crop boxes and flips as the worker path; pixels differ by at most
    one level (tensor vs PIL bilinear resize; libjpeg decodes alike). On CUDA nvjpeg may differ by
    a few levels more."""
    workers = _jpeg_dm(jpeg_folder)
    with pytest.warns(UserWarning, match="without CUDA"):
        device = _jpeg_dm(jpeg_folder, decode_jpeg_on_device=True)
    device.trainer = SimpleNamespace(world_size=1, global_rank=0, training=True, lightning_module=None)
    undecoded = next(iter(device.train_dataloader()))["cb"]
    assert isinstance(undecoded["image_data"], UndecodedImages) and "image" not in undecoded
    assert undecoded["image_data"].data[0].dim() in (1, 3)
    [png] = [i for i, path in enumerate(device.splits.train.items) if path.endswith(".png")]
    seen_png = False
    for expected, step in zip(workers.train_dataloader(), device.train_dataloader()):
        step = device.on_after_batch_transfer(step, 0)
        for stream in ("cb", "ib"):
            got, want = step[stream], expected[stream]
            assert torch.equal(got["index"], want["index"]) and torch.equal(got["label"], want["label"])
            assert got["image"].dtype == torch.uint8 and got["image"].shape == want["image"].shape
            assert (got["image"].int() - want["image"].int()).abs().max() <= 1
            seen_png |= png in got["index"].tolist()  # decoded by the worker, transformed on the device
    assert seen_png
    device.trainer.training = False  # evaluation: the eval transform
    for want, got in zip(workers.val_dataloader(), device.val_dataloader()):
        got = device.on_after_batch_transfer(got, 0)
        assert (got["image"].int() - want["image"].int()).abs().max() <= 1


def test_undecodable_jpeg_named_or_skipped_on_the_device(jpeg_folder):
    bad = jpeg_folder / "b" / "0.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    for skip in (False, True):
        with pytest.warns(UserWarning, match="without CUDA"):
            dm = _jpeg_dm(jpeg_folder, decode_jpeg_on_device=True, skip_unreadable=skip, sampling="instance",
                          batch_size=16, verify_images="off")  # what the device meets without the check
        dm.trainer = SimpleNamespace(world_size=1, global_rank=0, training=True, lightning_module=None)
        step = next(iter(dm.train_dataloader()))
        if not skip:
            with pytest.raises(DataFormatError, match=r"cannot decode JPEG .*b/0\.jpg.*data\.skip_unreadable"):
                dm.on_after_batch_transfer(step, 0)
            continue
        batch = dm.on_after_batch_transfer(step, 0)["ib"]
        assert batch["num_skipped"].item() == 1 and batch["image"].shape == (15, 3, 16, 16)
        assert batch["index"].numel() == batch["label"].numel() == 15


def test_lightning_decodes_on_the_device_through_the_datamodule_hook(jpeg_folder):
    import lightning as L

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 4)
            self.shapes = []

        def training_step(self, batch, batch_idx):
            self.shapes.append({k: (tuple(v["image"].shape), v["image"].dtype) for k, v in batch.items()})
            return self.layer(batch["cb"]["image"].float().mean(dim=(2, 3))).sum()

        def validation_step(self, batch, batch_idx):
            self.shapes.append(("val", tuple(batch["image"].shape)))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.warns(UserWarning, match="without CUDA"):
        dm = _jpeg_dm(jpeg_folder, decode_jpeg_on_device=True)
    model = Probe()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=2, num_sanity_val_steps=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    uint8 = ((4, 3, 16, 16), torch.uint8)
    assert model.shapes == [{"cb": uint8, "ib": uint8}] * 2 + [("val", (4, 3, 16, 16))]


def test_decoding_on_the_device_needs_image_files(tmp_path):
    with pytest.raises(DataFormatError, match="only image files can be decoded on the device"):
        LongTailImageDataset(Split([0], np.array([0])), None, images=np.zeros((1, 4, 4), np.uint8),
                             defer_decoding=True)


def test_loaders_pin_memory_on_cuda_only_and_keep_persistent_workers(folder, monkeypatch):
    """Pinned batches (for Lightning's non_blocking copies) where CUDA is, plain ones elsewhere; workers
    kept between epochs when asked, as every GPU data config asks."""
    dm = _dm(folder, num_workers=1, pin_memory=True, persistent_workers=True)
    loaders = (dm.train_dataloader(), dm.val_dataloader())
    assert not any(loader.pin_memory for loader in loaders)  # no CUDA here: pinning would fail
    assert all(loader.persistent_workers for loader in loaders)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert all(loader.pin_memory for loader in (dm.train_dataloader(), dm.val_dataloader()))
    assert not _dm(folder, num_workers=0, persistent_workers=True).train_dataloader().persistent_workers

    import yaml

    configs = Path(__file__).resolve().parents[1] / "configs" / "data"
    for path in configs.glob("*.yaml"):
        data = yaml.safe_load(path.read_text())
        if data.get("num_workers", 0) > 1:
            assert data.get("persistent_workers") is True, path.name
