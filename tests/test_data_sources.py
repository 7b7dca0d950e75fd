"""Dataset sources, long-tail profile and hold-out slices: real parsing of small files."""
from __future__ import annotations

import gzip
import io
import json
import os
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lpt_lightning.data import (
    FASHION_MNIST_CLASSES,
    AnnotationListSource,
    FashionMNISTSource,
    ImageFolderSource,
    INatJsonSource,
    balanced_holdout,
    cap_per_class,
    class_order,
    holdout_slices,
    long_tail_counts,
    make_long_tailed,
    read_idx,
    target_slices,
)
from lpt_lightning.errors import ConfigError, DataFormatError
from datasets_available import CIFAR_ARCHIVE, FMNIST, needs_fmnist

# ------------------------------------------------------------------------------ long-tail profile


def test_long_tail_counts_cifar10_ir100_exact():
    assert long_tail_counts(5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def test_long_tail_counts_cifar100_and_edge_cases():
    counts = long_tail_counts(500, 100, 100)
    assert counts[0] == 500 and counts[-1] == 5 and len(counts) == 100
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    assert sum(long_tail_counts(500, 100, 100)) == 10847  # CIFAR-100-LT IR100 size in the literature
    assert long_tail_counts(7, 3, 1) == [7, 7, 7]
    assert long_tail_counts(9, 1, 50) == [9]
    with pytest.raises(ConfigError, match="imbalance_ratio"):
        long_tail_counts(10, 3, 0.5)


def test_make_long_tailed_counts_determinism_and_subset():
    labels = np.repeat(np.arange(10), 60)
    np.random.default_rng(1).shuffle(labels)
    kept = make_long_tailed(labels, 10, seed=3)
    assert np.bincount(labels[kept]).tolist() == long_tail_counts(60, 10, 10)
    assert np.array_equal(kept, np.unique(kept))  # sorted, no duplicates
    assert np.array_equal(kept, make_long_tailed(labels, 10, seed=3))
    assert not np.array_equal(kept, make_long_tailed(labels, 10, seed=4))
    capped = make_long_tailed(labels, 10, seed=3, max_per_class=20)
    assert np.bincount(labels[capped]).tolist() == long_tail_counts(20, 10, 10)
    # n_max is the smallest class of the input
    uneven = np.concatenate([np.zeros(30, int), np.ones(12, int), np.full(50, 2)])
    assert np.bincount(uneven[make_long_tailed(uneven, 4, seed=0)]).tolist() == [12, 6, 3]


def test_class_order_permutes_which_classes_are_head_and_tail():
    labels = np.repeat(np.arange(10), 60)
    profile = long_tail_counts(60, 10, 10)
    assert class_order(10, None).tolist() == list(range(10))
    order = class_order(10, 1)
    assert sorted(order.tolist()) == list(range(10)) and order.tolist() != list(range(10))
    counts = np.bincount(labels[make_long_tailed(labels, 10, seed=3, class_order_seed=1)]).tolist()
    assert [counts[c] for c in order] == profile  # class order[i] gets the i-th largest count
    assert sorted(counts, reverse=True) == profile
    assert counts != np.bincount(labels[make_long_tailed(labels, 10, seed=3, class_order_seed=2)]).tolist()


def test_target_slices_hold_out_val_test_and_a_training_pool_disjoint_from_the_rest():
    labels = np.repeat(np.arange(4), 50)
    np.random.default_rng(0).shuffle(labels)
    val, test, pool, unused = target_slices(labels, 5, 10, 20, seed=7)
    # val and test are exactly holdout_slices', so a pool leaves every earlier slice in place
    hv, ht, rest = holdout_slices(labels, 5, 10, seed=7)
    assert np.array_equal(val, hv) and np.array_equal(test, ht)
    assert np.bincount(labels[pool]).tolist() == [20] * 4 and np.bincount(labels[unused]).tolist() == [15] * 4
    assert sorted(np.concatenate([pool, unused]).tolist()) == rest.tolist()
    assert not set(pool.tolist()) & set(unused.tolist())
    # without a pool the remainder is the pool and nothing is left unused
    _, _, whole, none = target_slices(labels, 5, 10, None, seed=7)
    assert np.array_equal(whole, rest) and none.size == 0
    with pytest.raises(ConfigError, match="train_pool_per_class"):
        target_slices(labels, 5, 10, 0, seed=7)


def test_image_folder_draws_the_long_tail_from_its_pool(tmp_path):
    for c in ("a", "b", "c"):
        (tmp_path / c).mkdir()
        for i in range(12):
            Image.new("RGB", (4, 4)).save(tmp_path / c / f"{i:02d}.jpg")
    kwargs = dict(imbalance_ratio=4, max_per_class=4, val_per_class=2, test_per_class=2, seed=0)
    pooled = ImageFolderSource(str(tmp_path), train_pool_per_class=5, **kwargs).load()
    plain = ImageFolderSource(str(tmp_path), **kwargs).load()
    assert pooled.val.items == plain.val.items and pooled.test.items == plain.test.items
    names = sorted(str(p) for p in tmp_path.rglob("*.jpg"))
    labels = np.repeat(np.arange(3), 12)
    _, _, pool, _ = target_slices(labels, 2, 2, 5, seed=0)
    assert set(pooled.train.items) <= {names[i] for i in pool}
    assert np.bincount(pooled.train.labels).tolist() == [4, 2, 1]
    permuted = ImageFolderSource(str(tmp_path), train_pool_per_class=5, class_order_seed=1, **kwargs).load()
    assert sorted(np.bincount(permuted.train.labels).tolist()) == [1, 2, 4]


def test_cap_per_class():
    labels = np.array([0] * 5 + [1] * 2 + [2] * 9)
    kept = cap_per_class(labels, 3, seed=0)
    assert np.bincount(labels[kept]).tolist() == [3, 2, 3]


def test_balanced_holdout_disjoint_and_balanced():
    labels = np.array([0] * 7 + [1] * 3 + [2] * 5)
    held, rest = balanced_holdout(labels, 3, seed=0)
    assert np.bincount(labels[held]).tolist() == [3, 3, 3]
    assert np.intersect1d(held, rest).size == 0
    assert sorted(np.concatenate([held, rest]).tolist()) == list(range(15))
    assert np.array_equal(held, balanced_holdout(labels, 3, seed=0)[0])
    with pytest.raises(DataFormatError, match="class 1: it has only 3"):
        balanced_holdout(labels, 4, seed=0)


# ------------------------------------------------------------------------------ annotation lists


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture()
def places_root(tmp_path):
    root = tmp_path / "places"
    _write(
        root / "Places_LT_train.txt",
        "/a/airfield/001.jpg 0\n/a/airfield/002.jpg 0\n\n/b/bar/001.jpg 1\n"
        "/a/apartment_building/outdoor/001.jpg 2\n/a/airfield/003.jpg 0\n",
    )
    _write(root / "Places_LT_val.txt", "val_256/v1.jpg 2\nval_256/v2.jpg 1\n")
    _write(root / "Places_LT_test.txt", "test_256/t1.jpg 0\n")
    _write(root / "categories_places365.txt", "/a/airfield 0\n/b/bar 1\n/a/apartment_building/outdoor 2\n")
    return root


def test_annotation_list_places_style(places_root, tmp_path):
    src = AnnotationListSource(
        root=str(places_root),
        train_list="Places_LT_train.txt",
        val_list=str(places_root / "Places_LT_val.txt"),  # absolute path works too
        test_list="Places_LT_test.txt",
        class_names_file="categories_places365.txt",
        name="places_lt",
    )
    s = src.load()
    assert s.name == "places_lt"
    assert s.class_names == ["airfield", "bar", "apartment_building/outdoor"]
    assert s.train.items[0] == str(places_root / "a/airfield/001.jpg")  # leading '/' is relative to root
    assert s.train.labels.tolist() == [0, 0, 1, 2, 0]
    assert s.train.labels.dtype == np.int64
    assert s.val.items == [str(places_root / "val_256/v1.jpg"), str(places_root / "val_256/v2.jpg")]
    assert s.val.labels.tolist() == [2, 1]
    assert s.test.labels.tolist() == [0]
    assert s.images is None and s.num_classes == 3
    assert s.train.origin.endswith("Places_LT_train.txt")


def test_annotation_list_names_derived_from_dirs(tmp_path):
    root = tmp_path / "imnet"
    _write(
        root / "train.txt",
        "train/n01440764/a.JPEG 0\ntrain/n01440764/b.JPEG 0\ntrain/x/c.JPEG 1\ntrain/y/d.JPEG 1\ntrain/n0222/e.JPEG 2\n",
    )
    s = AnnotationListSource(root=str(root), train_list="train.txt").load()
    # class 1 spans two directories -> generic name
    assert s.class_names == ["n01440764", "class_1", "n0222"]
    assert s.val is None and s.test is None


def test_annotation_list_derived_names_disambiguated(places_root):
    _write(places_root / "t.txt", "/a/arena/indoor/1.jpg 0\n/b/bar/indoor/2.jpg 1\n/b/bar/outdoor/3.jpg 2\n")
    s = AnnotationListSource(root=str(places_root), train_list="t.txt").load()
    assert s.class_names == ["arena/indoor", "bar/indoor", "outdoor"]


def test_names_file_plain_names(tmp_path):
    root = tmp_path / "r"
    _write(root / "train.txt", "a.jpg 0\nb.jpg 1\n")
    _write(root / "names.txt", "tench\ngoldfish shark\n")
    s = AnnotationListSource(root=str(root), train_list="train.txt", class_names_file="names.txt").load()
    assert s.class_names == ["tench", "goldfish shark"]


@pytest.mark.parametrize(
    "content, line_no, what",
    [
        ("a.jpg 0\nb.jpg 1\nc.jpg 1 extra\n", 3, "not an integer"),
        ("a.jpg 0\n\nb.jpg one\n", 3, "not an integer"),
        ("a.jpg\n", 1, "a path, then the label"),
    ],
)
def test_annotation_list_malformed_lines(tmp_path, content, line_no, what):
    root = tmp_path / "r"
    _write(root / "bad_train.txt", content)
    with pytest.raises(DataFormatError) as err:
        AnnotationListSource(root=str(root), train_list="bad_train.txt").load()
    msg = str(err.value)
    assert "bad_train.txt" in msg and f"line {line_no}" in msg and what in msg
    assert repr(content.splitlines()[line_no - 1].strip()) in msg  # shows the offending line


def test_annotation_list_label_out_of_range(places_root):
    _write(places_root / "val_bad.txt", "v1.jpg 0\nv2.jpg 3\n")
    with pytest.raises(DataFormatError) as err:
        AnnotationListSource(
            root=str(places_root), train_list="Places_LT_train.txt", val_list="val_bad.txt",
            class_names_file="categories_places365.txt",
        ).load()
    assert "val_bad.txt, line 2" in str(err.value) and "outside [0, 3)" in str(err.value)
    # without a names file C = max train label + 1 = 3, so a test label 5 is out of range
    _write(places_root / "test_bad.txt", "t.jpg 1\n\nt2.jpg 5\n")
    with pytest.raises(DataFormatError, match=r"test_bad.txt, line 3: label 5 is outside \[0, 3\)"):
        AnnotationListSource(root=str(places_root), train_list="Places_LT_train.txt", test_list="test_bad.txt").load()
    _write(places_root / "neg.txt", "t.jpg -1\n")
    with pytest.raises(DataFormatError, match="neg.txt, line 1"):
        AnnotationListSource(root=str(places_root), train_list="neg.txt").load()


def test_annotation_list_empty_class(places_root):
    _write(places_root / "train_gap.txt", "a/airfield/1.jpg 0\na/apartment_building/outdoor/1.jpg 2\n")
    with pytest.raises(DataFormatError) as err:
        AnnotationListSource(
            root=str(places_root), train_list="train_gap.txt", class_names_file="categories_places365.txt"
        ).load()
    assert "class 1 ('bar')" in str(err.value) and "no training images" in str(err.value)


def test_names_file_bad_index(tmp_path):
    root = tmp_path / "r"
    _write(root / "train.txt", "a.jpg 0\n")
    _write(root / "names.txt", "/a/x 0\n/b/y 0\n")
    with pytest.raises(DataFormatError, match="names.txt, line 2"):
        AnnotationListSource(root=str(root), train_list="train.txt", class_names_file="names.txt").load()


def test_annotation_list_missing_paths(tmp_path):
    with pytest.raises(DataFormatError, match="data.source.init_args.root"):
        AnnotationListSource(root=str(tmp_path / "nope"), train_list="t.txt").load()
    (tmp_path / "r").mkdir()
    with pytest.raises(DataFormatError, match=r"t\.txt does not exist; set data.source.init_args.train_list"):
        AnnotationListSource(root=str(tmp_path / "r"), train_list="t.txt").load()


# ------------------------------------------------------------------------------ iNaturalist json


def _coco(images, annotations, categories):
    return {"images": images, "annotations": annotations, "categories": categories}


@pytest.fixture()
def inat_root(tmp_path):
    root = tmp_path / "inat"
    cats = [{"id": 9, "name": "Zebra"}, {"id": 2, "name": "Aardvark"}, {"id": 5, "name": "Moth"}]
    train = _coco(
        [{"id": 10 + i, "file_name": f"train_val2018/c/{i}.jpg"} for i in range(5)],
        [{"id": i, "image_id": 10 + i, "category_id": c} for i, c in enumerate([9, 2, 5, 5, 2])],
        cats,
    )
    val = _coco(
        [{"id": 1, "file_name": "train_val2018/v/1.jpg"}, {"id": 2, "file_name": "train_val2018/v/2.jpg"}],
        [{"id": 0, "image_id": 2, "category_id": 5}, {"id": 1, "image_id": 1, "category_id": 9}],
        cats,
    )
    _write(root / "train2018.json", json.dumps(train))
    _write(root / "val2018.json", json.dumps(val))
    return root


def test_inat_json_noncontiguous_ids(inat_root):
    s = INatJsonSource(root=str(inat_root)).load()
    assert s.class_names == ["Aardvark", "Moth", "Zebra"]  # sorted ids 2, 5, 9 -> 0, 1, 2
    assert s.train.labels.tolist() == [2, 0, 1, 1, 0]
    assert s.train.items[0] == str(inat_root / "train_val2018/c/0.jpg")
    assert s.test.labels.tolist() == [2, 1]  # images order: id 1 (Zebra), id 2 (Moth)
    assert s.val is None  # iNat's official val is the benchmark test set, never validation


def test_inat_separate_val(inat_root):
    _write(inat_root / "myval.json", json.dumps(_coco(
        [{"id": 1, "file_name": "x.jpg"}], [{"image_id": 1, "category_id": 2}], [])))
    s = INatJsonSource(root=str(inat_root), val_json="myval.json").load()
    assert s.val.labels.tolist() == [0] and s.test.labels.tolist() == [2, 1]


def test_inat_errors(inat_root):
    _write(inat_root / "nokey.json", json.dumps({"images": [], "categories": []}))
    with pytest.raises(DataFormatError, match=r"nokey.json: missing top-level key 'annotations'"):
        INatJsonSource(root=str(inat_root), train_json="nokey.json").load()
    _write(inat_root / "unknown.json", json.dumps(_coco(
        [{"id": 1, "file_name": "a.jpg"}], [{"image_id": 7, "category_id": 2}], [{"id": 2, "name": "A"}])))
    with pytest.raises(DataFormatError, match=r"unknown.json: annotations\[0\] refers to unknown image_id 7"):
        INatJsonSource(root=str(inat_root), train_json="unknown.json").load()
    _write(inat_root / "broken.json", '{"images": [')
    with pytest.raises(DataFormatError, match="broken.json: invalid JSON"):
        INatJsonSource(root=str(inat_root), train_json="broken.json").load()
    _write(inat_root / "nofile.json", json.dumps(_coco(
        [{"id": 1}], [{"image_id": 1, "category_id": 2}], [{"id": 2, "name": "A"}])))
    with pytest.raises(DataFormatError, match=r"nofile.json: images\[0\] is missing key 'file_name'"):
        INatJsonSource(root=str(inat_root), train_json="nofile.json").load()
    _write(inat_root / "badcat.json", json.dumps(_coco(
        [{"id": 1, "file_name": "a.jpg"}], [{"image_id": 1, "category_id": 77}], [])))
    with pytest.raises(DataFormatError, match="badcat.json.*category_id 77"):
        INatJsonSource(root=str(inat_root), test_json="badcat.json").load()
    with pytest.raises(DataFormatError, match="set data.source.init_args.test_json"):
        INatJsonSource(root=str(inat_root), test_json="missing.json").load()



def test_inat_names_json_replaces_the_2018_placeholder_names(inat_root):
    # train2018.json names each category by its id; the species names are in categories.json.
    train = json.loads((inat_root / "train2018.json").read_text())
    real = {c["id"]: c["name"] for c in train["categories"]}
    for cat in train["categories"]:
        cat["name"] = str(cat["id"])
    _write(inat_root / "train2018.json", json.dumps(train))
    assert INatJsonSource(root=str(inat_root)).load().class_names == ["2", "5", "9"]
    names = [{"id": cid, "name": name, "supercategory": "Animalia"} for cid, name in real.items()]
    _write(inat_root / "categories.json", json.dumps(names + [{"id": 77, "name": "Unused"}]))
    s = INatJsonSource(root=str(inat_root), names_json="categories.json").load()
    assert s.class_names == ["Aardvark", "Moth", "Zebra"]  # in the order of the sorted train ids
    assert s.train.labels.tolist() == [2, 0, 1, 1, 0]
    _write(inat_root / "wrapped.json", json.dumps({"categories": names}))
    assert INatJsonSource(root=str(inat_root), names_json="wrapped.json").load().class_names == s.class_names


def test_inat_names_json_errors(inat_root):
    with pytest.raises(DataFormatError, match="set data.source.init_args.names_json"):
        INatJsonSource(root=str(inat_root), names_json="categories.json").load()
    _write(inat_root / "short.json", json.dumps([{"id": 2, "name": "Aardvark"}]))
    with pytest.raises(DataFormatError, match=r"short.json: no name for 2 of the 3 category ids .*\[5, 9\]"):
        INatJsonSource(root=str(inat_root), names_json="short.json").load()
    _write(inat_root / "twice.json", json.dumps([{"id": 2, "name": "A"}, {"id": 2, "name": "B"}]))
    with pytest.raises(DataFormatError, match=r"twice.json: categories\[1\] repeats category id 2"):
        INatJsonSource(root=str(inat_root), names_json="twice.json").load()
    _write(inat_root / "scalar.json", "3")
    with pytest.raises(DataFormatError, match="scalar.json: expected a list of categories"):
        INatJsonSource(root=str(inat_root), names_json="scalar.json").load()

# ------------------------------------------------------------------------------ image folder


def _image_folder(root: Path, per_class: dict[str, int], ext: str = ".png") -> None:
    for c, (name, n) in enumerate(per_class.items()):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (6, 6), (40 * c, 10 * i % 255, 0)).save(d / f"{i:03d}{ext}")
    (root / next(iter(per_class)) / "notes.txt").write_text("not an image")


def test_image_folder_holdout_then_long_tail(tmp_path):
    root = tmp_path / "folder"
    _image_folder(root, {"b_cls": 12, "a_cls": 12, "c_cls": 12})
    src = ImageFolderSource(root=str(root), imbalance_ratio=10, val_per_class=1, test_per_class=1, seed=5)
    s = src.load()
    assert s.class_names == ["a_cls", "b_cls", "c_cls"]
    assert np.bincount(s.val.labels).tolist() == [1, 1, 1]
    assert np.bincount(s.test.labels).tolist() == [1, 1, 1]
    assert np.bincount(s.train.labels).tolist() == [10, 3, 1]  # long_tail_counts(10, 3, 10)
    all_items = s.train.items + s.val.items + s.test.items
    assert len(set(all_items)) == len(all_items)  # disjoint
    assert all(Path(p).parent.name == s.class_names[y] for p, y in zip(s.train.items, s.train.labels))
    assert not any(p.endswith(".txt") for p in all_items)
    again = src.load()
    assert again.train.items == s.train.items and again.val.items == s.val.items
    with pytest.raises(DataFormatError, match="lower val_per_class"):
        ImageFolderSource(root=str(root), val_per_class=13).load()


def _tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _png_bytes(color=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format="PNG")
    return buf.getvalue()


def test_image_folder_archive_with_top_folder(tmp_path):
    archive = _tar(tmp_path / "cifar.tar.gz", {
        "train/cat/0.png": _png_bytes(), "train/cat/1.png": _png_bytes(),
        "train/dog/0.png": _png_bytes((0, 0, 255)),
    })
    root = tmp_path / "extracted" / "train"
    s = ImageFolderSource(root=str(root), archive=str(archive)).load()
    assert s.class_names == ["cat", "dog"] and s.train.labels.tolist() == [0, 0, 1]
    assert (root / "cat" / "0.png").is_file()
    assert sorted(os.listdir(tmp_path / "extracted")) == ["train"]  # temp dir cleaned up
    # root exists now: loading again does not need (or touch) the archive
    archive.unlink()
    assert len(ImageFolderSource(root=str(root), archive=str(archive)).load().train) == 3


def test_image_folder_archive_without_top_folder(tmp_path):
    archive = _tar(tmp_path / "flat.tar.gz", {"cat/0.png": _png_bytes(), "dog/0.png": _png_bytes()})
    root = tmp_path / "data"
    assert ImageFolderSource(root=str(root), archive=str(archive)).load().class_names == ["cat", "dog"]


def test_image_folder_rejects_unsafe_archive(tmp_path):
    archive = _tar(tmp_path / "evil.tar.gz", {"train/cat/0.png": _png_bytes(), "../escape.txt": b"x"})
    with pytest.raises(DataFormatError, match="unsafe member path"):
        ImageFolderSource(root=str(tmp_path / "out" / "train"), archive=str(archive)).load()
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "out" / "train").exists()
    abs_archive = _tar(tmp_path / "abs.tar.gz", {"/etc/evil.png": _png_bytes()})
    with pytest.raises(DataFormatError, match="unsafe member path"):
        ImageFolderSource(root=str(tmp_path / "out2"), archive=str(abs_archive)).load()



@pytest.mark.parametrize("kind, target", [
    (tarfile.SYMTYPE, "../../../../outside"),  # from <dest>/train/cat: tmp_path/outside
    (tarfile.SYMTYPE, "{outside}"),
    (tarfile.LNKTYPE, "{outside}/x"),
    (tarfile.LNKTYPE, "../outside/x"),  # hard links are relative to dest
])
def test_image_folder_rejects_links_out_of_the_archive(tmp_path, kind, target):
    """A link member pointing out of the extraction folder, then a file written through it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    archive = tmp_path / "links.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        link = tarfile.TarInfo("train/cat/link")
        link.type, link.linkname = kind, target.format(outside=outside)
        tar.addfile(link)
        info = tarfile.TarInfo("train/cat/link/0.png")
        info.size = len(_png_bytes())
        tar.addfile(info, io.BytesIO(_png_bytes()))
    with pytest.raises(DataFormatError, match=r"links\.tar\.gz: unsafe member \('train/cat/link' (would link to|is a link)"):
        ImageFolderSource(root=str(tmp_path / "out" / "train"), archive=str(archive)).load()
    assert list(outside.iterdir()) == [] and list((tmp_path / "out").iterdir()) == []  # temp dir removed too


def test_image_folder_unreadable_archive(tmp_path):
    good = _tar(tmp_path / "good.tar.gz", {f"train/cat/{i}.png": os.urandom(2000) for i in range(4)}).read_bytes()
    for name, data in (("random.tar.gz", b"not an archive" * 10), ("cut.tar.gz", good[:len(good) // 2])):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataFormatError, match=rf"{name}: not a readable tar archive \(.+\); check the file"):
            ImageFolderSource(root=str(tmp_path / "out" / "train"), archive=str(tmp_path / name)).load()
        assert list((tmp_path / "out").iterdir()) == []


def test_image_folder_skips_hidden_directories(tmp_path):
    """Notebook and trash folders are not classes (torchvision's find_classes alone would make
    ``.ipynb_checkpoints`` class 0 and shift every label)."""
    root = tmp_path / "folder"
    _image_folder(root, {"cat": 2, "dog": 1, ".ipynb_checkpoints": 1})
    s = ImageFolderSource(root=str(root)).load()
    assert s.class_names == ["cat", "dog"] and s.train.labels.tolist() == [0, 0, 1]
    assert [Path(p).relative_to(root).as_posix() for p in s.train.items] == ["cat/000.png", "cat/001.png", "dog/000.png"]
    only_hidden = tmp_path / "hidden_only"
    _image_folder(only_hidden, {".Trash-1000": 1})
    with pytest.raises(DataFormatError, match="hidden_only has no class sub-directories"):
        ImageFolderSource(root=str(only_hidden)).load()

def test_image_folder_errors(tmp_path):
    with pytest.raises(DataFormatError, match="does not exist; set data.source.init_args.root"):
        ImageFolderSource(root=str(tmp_path / "missing")).load()
    (tmp_path / "f" / "empty_class").mkdir(parents=True)
    with pytest.raises(DataFormatError, match="empty_class.*contains no images"):
        ImageFolderSource(root=str(tmp_path / "f")).load()


# ------------------------------------------------------------------------------ Fashion-MNIST IDX


def _idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_fashion(root: Path, n_train_per_class=6, n_test_per_class=3, gz=True, hw=4) -> tuple:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = {}
    for prefix, n in (("train", n_train_per_class), ("t10k", n_test_per_class)):
        labels = np.tile(np.arange(10), n).astype(np.uint8)
        images = rng.integers(0, 256, size=(labels.size, hw, hw), dtype=np.uint8)
        for kind, arr in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
            data = _idx_bytes(arr)
            name = root / f"{prefix}-{kind}"
            if gz:
                with gzip.open(f"{name}.gz", "wb") as fh:
                    fh.write(data)
            else:
                name.write_bytes(data)
        out[prefix] = (images, labels)
    return out


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx(tmp_path, gz):
    ref = _write_fashion(tmp_path / "fm", gz=gz)
    s = FashionMNISTSource(root=str(tmp_path / "fm"), max_test_per_class=2).load()
    assert s.class_names == FASHION_MNIST_CLASSES and s.class_names[0] == "T-shirt/top"
    assert s.images.shape == (90, 4, 4) and s.images.dtype == np.uint8
    assert len(s.train) == 60 and s.train.items == list(range(60))
    assert np.array_equal(s.images[:60], ref["train"][0])
    assert s.train.labels.tolist() == ref["train"][1].tolist()
    assert np.bincount(s.test.labels).tolist() == [2] * 10
    assert all(60 <= i < 90 for i in s.test.items)  # test items index past the train images
    for item, label in zip(s.test.items, s.test.labels):
        assert ref["t10k"][1][item - 60] == label
    assert s.val is None


def test_fashion_mnist_long_tail_and_val(tmp_path, monkeypatch):
    _write_fashion(tmp_path / "fm", n_train_per_class=12)
    monkeypatch.setenv("LPT_FASHION_MNIST_DIR", str(tmp_path / "fm"))  # root from the environment
    s = FashionMNISTSource(imbalance_ratio=10, val_per_class=2, seed=1).load()
    assert np.bincount(s.val.labels).tolist() == [2] * 10
    assert np.bincount(s.train.labels).tolist() == long_tail_counts(10, 10, 10)
    assert not set(s.train.items) & set(s.val.items)


def test_fashion_mnist_bad_files(tmp_path):
    root = tmp_path / "fm"
    _write_fashion(root, gz=False)
    lbl = root / "train-labels-idx1-ubyte"
    good = lbl.read_bytes()
    lbl.write_bytes(b"\x12\x34" + good[2:])
    with pytest.raises(DataFormatError, match=r"train-labels-idx1-ubyte: bad IDX magic number 1234"):
        FashionMNISTSource(root=str(root)).load()
    lbl.write_bytes(good[:-3])
    with pytest.raises(DataFormatError, match=r"train-labels-idx1-ubyte: IDX payload has 57 bytes.*truncated"):
        FashionMNISTSource(root=str(root)).load()
    lbl.write_bytes(good)
    (root / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(DataFormatError, match=r"t10k-images-idx3-ubyte\(\.gz\) not found"):
        FashionMNISTSource(root=str(root)).load()
    cut = tmp_path / "cut.gz"
    cut.write_bytes(gzip.compress(good)[:-10])
    with pytest.raises(DataFormatError, match="cut.gz: cannot read IDX file"):
        read_idx(cut)
    with pytest.raises(DataFormatError, match="LPT_FASHION_MNIST_DIR"):
        FashionMNISTSource(root=str(tmp_path / "absent")).load()


@needs_fmnist
def test_real_fashion_mnist():
    s = FashionMNISTSource(root=str(FMNIST)).load()
    assert len(s.train) == 60000 and len(s.test) == 10000
    assert s.images.shape == (70000, 28, 28)
    assert np.bincount(s.train.labels).tolist() == [6000] * 10
    assert np.bincount(s.test.labels).tolist() == [1000] * 10
    lt = FashionMNISTSource(root=str(FMNIST), imbalance_ratio=100).load()
    assert np.bincount(lt.train.labels).tolist() == [6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60]


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR_ARCHIVE.exists(), reason="CIFAR-10 JPEG archive not available")
def test_real_cifar10_archive_long_tail(tmp_path):
    s = ImageFolderSource(root=str(tmp_path / "cifar10" / "train"), archive=str(CIFAR_ARCHIVE),
                          imbalance_ratio=100, test_per_class=100, seed=0).load()
    assert s.class_names[:2] == ["airplane", "automobile"] and s.num_classes == 10
    assert np.bincount(s.test.labels).tolist() == [100] * 10
    assert np.bincount(s.train.labels).tolist() == long_tail_counts(4900, 10, 100)


def test_image_folder_with_official_test_folder(tmp_path):
    from PIL import Image

    from lpt_lightning.data import ImageFolderSource
    from lpt_lightning.errors import DataFormatError

    for split, n in (("train", 6), ("test", 2)):
        for cls in ("ant", "bee"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (4, 4)).save(d / f"{i}.png")
    splits = ImageFolderSource(str(tmp_path / "train"), test_root=str(tmp_path / "test"), imbalance_ratio=2).load()
    assert splits.train.class_counts(2).tolist() == [6, 3]
    assert splits.test.class_counts(2).tolist() == [2, 2]
    assert all("/test/" in p for p in splits.test.items)
    (tmp_path / "test" / "cat").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "test" / "cat" / "0.png")
    with pytest.raises(DataFormatError, match=r"other classes .*cat"):
        ImageFolderSource(str(tmp_path / "train"), test_root=str(tmp_path / "test")).load()


# ------------------------------------------------------------------------------ messy real-world files


def test_byte_order_mark_crlf_and_spaces_in_list_files(tmp_path):
    """Windows editors write a BOM and CRLF; image names may contain spaces (the label is last)."""
    root = tmp_path / "r"
    path = root / "train.txt"
    path.parent.mkdir(parents=True)
    path.write_bytes("\ufeffdir a/img 1.jpg 0\r\nb.jpg   1\r\n".encode("utf-8"))
    (root / "names.txt").write_bytes("\ufeffcat\r\ndog\r\n".encode("utf-8"))
    s = AnnotationListSource(root=str(root), train_list="train.txt", class_names_file="names.txt").load()
    assert s.train.items == [str(root / "dir a/img 1.jpg"), str(root / "b.jpg")]
    assert s.train.labels.tolist() == [0, 1] and s.class_names == ["cat", "dog"]
    assert s.train.where(1) == f"{path}, line 2"


def test_byte_order_mark_in_json(inat_root):
    text = (inat_root / "train2018.json").read_text()
    (inat_root / "train2018.json").write_bytes("\ufeff".encode() + text.encode())
    s = INatJsonSource(root=str(inat_root)).load()
    assert s.class_names == ["Aardvark", "Moth", "Zebra"]
    assert s.train.where(0) == f"{inat_root / 'train2018.json'}, images[0]"


def test_stray_label_without_class_names_is_reported_where_it_is_written(tmp_path):
    root = tmp_path / "r"
    _write(root / "train.txt", "a.jpg 0\nb.jpg 1\nc.jpg 2\nd.jpg 3\ne.jpg 70\n")
    with pytest.raises(DataFormatError) as err:
        AnnotationListSource(root=str(root), train_list="train.txt").load()
    assert f"{root / 'train.txt'}, line 5: label 70 is outside [0, 4)" in str(err.value)
    assert "class_names_file" in str(err.value)


def test_predict_list_with_spaces_and_bom(tmp_path):
    from lpt_lightning.data.datamodule import image_paths_split

    listing = tmp_path / "predict.txt"
    listing.write_bytes("\ufeffmy photos/a 1.jpg\r\n/abs/b.jpg 3\r\n".encode())
    split = image_paths_split(str(listing))
    assert split.items == [str(tmp_path / "my photos/a 1.jpg"), "/abs/b.jpg"]
    assert split.where(1) == f"{listing}, line 2"
