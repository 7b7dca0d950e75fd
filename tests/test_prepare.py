"""`lpt prepare` and `PreparedSource`: the prepared copy gives the DataModule the same items, labels,
held-out split, sampler draws, augmented batches and split metrics as the raw files; resizing;
resume after a kill; the manifest checks."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader

import lpt_lightning.prepare as prepare_module
from lpt_lightning import cli
from lpt_lightning.data import (
    AnnotationListSource,
    ImageFolderSource,
    LongTailDataModule,
    PreparedSource,
)
from lpt_lightning.data.prepared import MANIFEST, ShardReader, items_file, part_path
from lpt_lightning.data.sources import DatasetSplits, DataSource, Split
from lpt_lightning.errors import ConfigError, DataFormatError
from lpt_lightning.models.expert import ExpertSpec
from lpt_lightning.phases import AdaptPhase
from lpt_lightning.prepare import encode_image, prepare
from tiny_models import tiny_backbone

TRAIN_COUNTS, TEST_PER_CLASS = (12, 6, 3, 3), 2


def _photo(rng, w, h) -> Image.Image:
    """Noisy gradients: a JPEG of it is neither trivial nor uniform."""
    base = np.linspace(0, 255, w)[None, :, None] * rng.random(3)
    return Image.fromarray(np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8))


@pytest.fixture()
def lists(tmp_path) -> Path:
    """A list-file dataset: 24 long-tailed train and 8 test JPEGs of 36..63 px (all smaller than any
    short_side used here except in the resize test, so the copies are byte for byte)."""
    root = tmp_path / "raw"
    rng = np.random.default_rng(0)
    for split, counts in (("train", TRAIN_COUNTS), ("test", (TEST_PER_CLASS,) * 4)):
        lines = []
        for c, n in enumerate(counts):
            (root / f"c{c}").mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rel = f"c{c}/{split}_{i}.jpg"
                _photo(rng, int(rng.integers(36, 64)), int(rng.integers(36, 64))).save(root / rel, quality=85)
                lines.append(f"{rel} {c}")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def _list_source(root: Path) -> AnnotationListSource:
    return AnnotationListSource(root=str(root), train_list="train.txt", test_list="test.txt", name="tiny_lists")


def _dm(source, **kw) -> LongTailDataModule:
    args = dict(batch_size=4, num_workers=0, img_size=32, pin_memory=False, holdout_per_class=1,
                holdout_max_fraction=0.4, seed=3)
    return LongTailDataModule(source=source, **{**args, **kw})


def _decoded(dm: LongTailDataModule, name: str) -> list[np.ndarray]:
    split = getattr(dm.splits, name)
    ds = dm._dataset(name, split, train=False)
    return [np.asarray(ds.load_image(i)) for i in range(len(split))]


def _stored(root: Path) -> dict:
    """Everything a reader sees of a prepared copy: per split, items file and stored images."""
    splits = PreparedSource(str(root)).load()
    out = {}
    for name in ("train", "val", "test"):
        split = getattr(splits, name)
        if split is None:
            continue
        images = [splits.images[i] if splits.images is not None else Path(i).read_bytes() for i in split.items]
        out[name] = (items_file(root, name).read_text(), images)
    return out


# ------------------------------------------------------------------------------ same data as raw


@pytest.mark.parametrize("fmt", ["litdata", "tree"])
def test_prepared_copy_gives_the_datamodule_the_same_images_splits_and_draws(lists, tmp_path, fmt):
    out = tmp_path / f"prepared_{fmt}"
    manifest = prepare(_list_source(lists), out, fmt=fmt, short_side=256, workers=2, part_size=5, progress=False)
    assert manifest["this_run"]["copied"] == 32 and manifest["this_run"]["resized"] == 0
    assert manifest["splits"]["train"]["parts"] == 5 and manifest["splits"]["test"]["parts"] == 2
    raw, ready = _dm(_list_source(lists)), _dm(PreparedSource(str(out), short_side=256))

    assert ready.splits.name == raw.splits.name and ready.class_names == raw.class_names
    for name in ("train", "val", "test"):  # val: the held-out split carved from train
        assert np.array_equal(getattr(ready.splits, name).labels, getattr(raw.splits, name).labels)
        assert [a.tobytes() for a in _decoded(ready, name)] == [a.tobytes() for a in _decoded(raw, name)]
    assert ready.holdout_summary == raw.holdout_summary
    assert torch.equal(ready.group_class_counts, raw.group_class_counts)
    if fmt == "tree":  # the same relative paths: the same split digests as the raw files
        assert ready.data_record() == raw.data_record()
        assert [Path(p).relative_to(out / "images") for p in ready.splits.train.items] == [
            Path(p).relative_to(lists) for p in raw.splits.train.items]

    for kind in ("cb", "ib"):
        raw_draws, ready_draws = list(raw.train_sampler(kind)), list(ready.train_sampler(kind))
        assert ready_draws == raw_draws and len(raw_draws) == 20
    # Augmented batches (Draw-seeded crops and flips), the prepared copy read by 2 loader workers.
    raw.setup("fit"), ready.setup("fit")

    def batches(dm, workers):
        ds = dm._dataset("train", dm.splits.train, train=True)
        return list(DataLoader(ds, batch_size=4, sampler=dm.train_sampler("cb"), num_workers=workers))

    for a, b in zip(batches(raw, 0), batches(ready, 2), strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
        assert torch.equal(a["index"], b["index"])


def test_split_metrics_identical_on_raw_and_prepared(lists, tmp_path):
    prepare(_list_source(lists), tmp_path / "p", short_side=256, workers=1, part_size=7, progress=False)
    results = []
    for source in (_list_source(lists), PreparedSource(str(tmp_path / "p"))):
        torch.manual_seed(0)
        dm = _dm(source, eval_batch_size=5)
        model = AdaptPhase(expert=ExpertSpec(kind="visual", backbone=tiny_backbone("visual"), prompt_length=2),
                           num_classes=dm.num_classes, class_names=dm.class_names)
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=tmp_path)
        metrics = trainer.test(model, datamodule=dm, verbose=False)
        model.eval()
        with torch.no_grad():
            logits = torch.cat([model.expert(b["image"]).logits for b in dm.split_dataloader("test")])
        results.append((metrics, logits))
    (raw_metrics, raw_logits), (ready_metrics, ready_logits) = results
    assert json.dumps(ready_metrics) == json.dumps(raw_metrics) and "test/acc" in raw_metrics[0]  # NaN: no class
    assert torch.equal(ready_logits, raw_logits) and raw_logits.shape == (8, 4)


# ------------------------------------------------------------------------------ resizing


def test_resize_to_short_side_and_byte_copies(tmp_path):
    root = tmp_path / "raw"
    rng = np.random.default_rng(1)
    shapes = {"a/wide.jpg": (200, 120), "a/tall.png": (90, 150), "b/small.jpg": (64, 48), "b/edge.jpg": (80, 64)}
    for rel, (w, h) in shapes.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        _photo(rng, w, h).save(root / rel)
    out = tmp_path / "p"
    manifest = prepare(ImageFolderSource(root=str(root)), out, short_side=64, quality=80, workers=1,
                       progress=False)
    assert manifest["this_run"] == {"copied": 2, "resized": 2, "seconds": manifest["this_run"]["seconds"]}
    splits = PreparedSource(str(out)).load()
    expected = {"a/tall.png": (64, 107), "a/wide.jpg": (107, 64), "b/edge.jpg": (80, 64), "b/small.jpg": (64, 48)}
    rels = json.loads(items_file(out, "train").read_text())["paths"]
    assert sorted(rels) == sorted(expected)
    for i, rel in zip(splits.train.items, rels):
        data = splits.images[i]
        with Image.open(io.BytesIO(data)) as img:
            assert img.size == expected[rel] and min(img.size) == min(64, *shapes[rel])
            resized = min(shapes[rel]) > 64
            assert img.format == "JPEG" if resized else data == (root / rel).read_bytes()
    # encode_image alone: the shorter side is exactly short_side, the aspect ratio kept
    data, kind = encode_image(str(root / "a/wide.jpg"), 100, 90)
    assert kind == "resized" and Image.open(io.BytesIO(data)).size == (167, 100)


# ------------------------------------------------------------------------------ resume, manifest


class Killed(Exception):
    pass


@pytest.mark.parametrize("fmt", ["litdata", "tree"])
def test_resume_after_interruption_equals_an_uninterrupted_run(lists, tmp_path, monkeypatch, fmt):
    whole = tmp_path / "whole"
    prepare(_list_source(lists), whole, fmt=fmt, short_side=40, workers=1, part_size=6, progress=False)

    out = tmp_path / "interrupted"
    calls = {"n": 0}
    real = prepare_module._encode_task

    def dies_after_13(task):
        calls["n"] += 1
        if calls["n"] > 13:  # mid-way through the third part
            raise Killed
        return real(task)

    monkeypatch.setattr(prepare_module, "_encode_task", dies_after_13)
    with pytest.raises(Killed):
        prepare(_list_source(lists), out, fmt=fmt, short_side=40, workers=1, part_size=6, progress=False)
    assert not (out / MANIFEST).exists() and part_path(out, "train", 1).exists()
    assert not part_path(out, "train", 2).exists()
    with pytest.raises(DataFormatError, match=r"incomplete \(2 of 6 parts written.*rerun the same `lpt prepare`"):
        _dm(PreparedSource(str(out))).setup("fit")  # the DataModule refuses the unfinished copy

    calls["n"] = -10**9  # no more kills
    prepare(_list_source(lists), out, fmt=fmt, short_side=40, workers=1, part_size=6, progress=False)
    assert calls["n"] == -10**9 + 32 - 12  # the two finished parts were not redone
    assert _stored(out) == _stored(whole)
    manifests = [json.loads((d / MANIFEST).read_text()) for d in (whole, out)]
    for m in manifests:
        m.pop("this_run")
    assert manifests[0] == manifests[1]


def test_manifest_checks_name_the_manifest_and_what_to_do(lists, tmp_path):
    with pytest.raises(DataFormatError, match=r"manifest.json does not exist: .* is not a prepared dataset; .*lpt prep"):
        PreparedSource(str(tmp_path / "nothing")).load()
    out = tmp_path / "p"
    prepare(_list_source(lists), out, short_side=40, workers=1, part_size=8, progress=False)
    with pytest.raises(DataFormatError, match="prepared with --short_side 40, but data.source.init_args.short_side"):
        PreparedSource(str(out), short_side=256).load()
    with pytest.raises(ConfigError, match=r"other settings or other data \(settings: .*'short_side': 40.*use another"):
        prepare(_list_source(lists), out, short_side=64, workers=1, part_size=8, progress=False)

    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    stored = json.loads(items_file(broken, "train").read_text())
    stored["labels"][0] = 1
    items_file(broken, "train").write_text(json.dumps(stored))
    with pytest.raises(DataFormatError, match=r"train.items.json does not match .*manifest.json .*prepare it again"):
        PreparedSource(str(broken)).load()
    shutil.rmtree(broken)
    shutil.copytree(out, broken)
    shutil.rmtree(part_path(broken, "test", 0))
    with pytest.raises(DataFormatError, match=r"parts/test/00000 is missing .*lists it; prepare the dataset again"):
        PreparedSource(str(broken)).load()
    manifest = json.loads((broken / MANIFEST).read_text())
    (broken / MANIFEST).write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(DataFormatError, match="version 99 is not one this lpt_lightning reads"):
        PreparedSource(str(broken)).load()


def test_unreadable_image_is_reported_with_its_line_and_a_rerun_finishes(lists, tmp_path):
    good = (lists / "c1/train_2.jpg").read_bytes()
    (lists / "c1/train_2.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "p"
    with pytest.raises(DataFormatError, match=r"1 of 32 images cannot be read:\n  .*c1/train_2.jpg \(.*train.txt, line 15\)"):
        prepare(_list_source(lists), out, workers=2, part_size=8, progress=False)
    assert not (out / MANIFEST).exists() and not part_path(out, "train", 1).exists()  # line 15: part 1
    assert part_path(out, "train", 0).exists() and part_path(out, "train", 2).exists()
    (lists / "c1/train_2.jpg").write_bytes(good)
    prepare(_list_source(lists), out, workers=2, part_size=8, progress=False)
    assert len(PreparedSource(str(out)).load().train) == 24


def test_reader_pickles_unopened_and_opens_in_each_process(lists, tmp_path):
    prepare(_list_source(lists), tmp_path / "p", workers=1, part_size=10, progress=False)
    splits = PreparedSource(str(tmp_path / "p")).load()
    reader = splits.images
    assert isinstance(reader, ShardReader) and len(reader) == 32 and reader[31] == splits.images[31]
    assert reader._opened  # opened here by the reads above
    import pickle

    copy = pickle.loads(pickle.dumps(reader))
    assert copy._opened == {} and copy[0] == reader[0] == (lists / "c0/train_0.jpg").read_bytes()
    with pytest.raises(IndexError):
        reader[32]


def test_in_memory_source_is_refused(tmp_path):
    class InMemory(DataSource):
        def load(self):
            split = Split([0, 1], np.array([0, 1]), origin="memory")
            return DatasetSplits("mem", split, None, None, ["a", "b"], images=np.zeros((2, 4, 4), np.uint8))

    with pytest.raises(ConfigError, match="holds its images in memory"):
        prepare(InMemory(), tmp_path / "p", progress=False)


# ------------------------------------------------------------------------------ the command


def test_lpt_prepare_reads_the_data_source_of_a_fit_or_pipeline_config(lists, tmp_path, capsys):
    source = {"class_path": "lpt_lightning.data.AnnotationListSource",
              "init_args": {"root": str(lists), "train_list": "train.txt", "test_list": "test.txt", "name": "tiny"}}
    fit = tmp_path / "fit.yaml"
    fit.write_text(yaml.safe_dump({"model": {"class_path": "x"}, "data": {"source": source, "batch_size": 4}}))
    cli.main(["prepare", "--config", str(fit), "--output", str(tmp_path / "p"), "--format", "tree",
              "--short_side", "48", "--quality", "75", "--workers", "2", "--part_size", "9"])
    printed = capsys.readouterr().out
    assert "prepared tiny (train 24, test 8;" in printed and "lpt_lightning.data.PreparedSource" in printed
    manifest = json.loads((tmp_path / "p" / MANIFEST).read_text())
    assert manifest["settings"] == {"short_side": 48, "quality": 75, "part_size": 9}
    assert manifest["source"] == source and manifest["format"] == "tree"
    assert all(min(Image.open(p).size) <= 48 for p in PreparedSource(str(tmp_path / "p")).load().train.items)

    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"run_dir": "runs/x", "data": {"source": {**source, "init_args": {
        **source["init_args"], "root": str(tmp_path / "missing")}}}}))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["prepare", "--config", str(pipeline), "--output", str(tmp_path / "q")])
    assert exit_info.value.code == 2
    assert "missing does not exist; set data.source.init_args.root" in capsys.readouterr().err
