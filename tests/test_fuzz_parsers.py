"""Fuzzing the annotation parsers: whatever the input, a parser either returns a consistent
`DatasetSplits` or raises one of the project's own errors (an `LPTError`) naming the file.

Any other exception (KeyError, TypeError, UnicodeDecodeError, OverflowError, a numpy
ValueError, MemoryError...) is a bug. Hypothesis runs derandomized, so CI sees the same
examples every time; the `@example`s pin inputs that once broke a parser.
"""
from __future__ import annotations

import gzip
import json
import io
import math
import struct
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from lpt_lightning.data import AnnotationListSource, FashionMNISTSource, INatJsonSource, read_idx
from lpt_lightning.data.sources import FASHION_MNIST_CLASSES, DatasetSplits
from lpt_lightning.errors import DataFormatError, LPTError

FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.data_too_large])


def outcome(load, *files: Path) -> DatasetSplits | None:
    """Run ``load``; our own error is a fine outcome, a data error must name one of ``files``."""
    try:
        result = load()
    except DataFormatError as exc:
        event(f"DataFormatError: {str(exc).split(': ', 1)[-1][:25]}")
        assert any(str(f) in str(exc) for f in files), f"error names none of the input files: {exc}"
    except LPTError as exc:  # ConfigError: the options do not fit the data (e.g. an imbalance ratio)
        event(f"{type(exc).__name__}")
    else:
        event("loaded")
        return result
    return None


def check_consistent(splits: DatasetSplits, file_items: bool = True) -> None:
    num_classes = splits.num_classes
    assert num_classes >= 1 and len(splits.class_names) == num_classes
    assert all(isinstance(n, str) for n in splits.class_names)
    for split in (splits.train, splits.val, splits.test):
        if split is None:
            continue
        assert len(split.items) == len(split.labels) and split.labels.dtype == np.int64
        assert split.labels.ndim == 1
        if len(split):
            assert 0 <= split.labels.min() and split.labels.max() < num_classes
        assert all(isinstance(i, str) if file_items else isinstance(i, int) for i in split.items)
    # every class has a training image
    assert np.bincount(splits.train.labels, minlength=num_classes).min() >= 1


# ------------------------------------------------------------------------------ list files

_token_chars = st.characters(blacklist_categories=("Cs", "Zs", "Zl", "Zp", "Cc"))
_path = st.text(_token_chars, min_size=1, max_size=10)
_label = st.one_of(
    st.integers(-2, 6).map(str),
    st.integers().map(str),  # unbounded: huge and negative
    st.integers(2**62, 2**80).map(str),
    st.text(max_size=5),
)
_line = st.one_of(
    st.tuples(_path, _label).map(" ".join),
    st.tuples(_path, _label).map(" ".join),
    st.text(max_size=30),  # anything, NUL bytes and unicode separators included
    st.just(""),
)


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # lone surrogates make invalid UTF-8 too


def _text_file(lines):
    return st.one_of(
        st.lists(lines, max_size=10).map(lambda ls: _utf8("\n".join(ls))),
        st.lists(lines, max_size=10).map(lambda ls: _utf8("\r\n".join(ls) + "\n")),
        st.binary(max_size=120),
    )


def _valid_list(n_classes: int, n_lines: int) -> list[str]:
    return [f"/c{i % n_classes}/img{i}.jpg {i % n_classes}" for i in range(n_lines)]


@st.composite
def list_file(draw):
    """A valid list with a few mutated lines, or a fully random one."""
    if draw(st.booleans()):
        return draw(_text_file(_line))
    lines = _valid_list(draw(st.integers(1, 4)), draw(st.integers(1, 8)))
    for _ in range(draw(st.integers(0, 2))):
        lines[draw(st.integers(0, len(lines) - 1))] = draw(_line)
    return _utf8("\n".join(lines) + "\n")


_name_line = st.one_of(
    st.text(_token_chars, min_size=1, max_size=8),
    st.tuples(st.text(_token_chars, min_size=1, max_size=8), st.integers(-1, 5).map(str)).map(" ".join),
    st.tuples(st.text(max_size=8), st.integers().map(str)).map(" ".join),
    st.text(max_size=12),
)


class TestAnnotationList:
    def load(self, root: Path, train: bytes, names: bytes | None, val: bytes | None):
        (root / "train.txt").write_bytes(train)
        files = [root / "train.txt"]
        kwargs = {}
        if names is not None:
            (root / "names.txt").write_bytes(names)
            kwargs["class_names_file"] = "names.txt"
            files.append(root / "names.txt")
        if val is not None:
            (root / "val.txt").write_bytes(val)
            kwargs["val_list"] = "val.txt"
            files.append(root / "val.txt")
        return outcome(lambda: AnnotationListSource(root=str(root), train_list="train.txt", **kwargs).load(), *files)

    @FUZZ
    @given(train=list_file(), names=st.none() | _text_file(_name_line), val=st.none() | list_file())
    @example(train=b"a.jpg 0\nb.jpg \xff\xfe 1\n", names=None, val=None)  # not UTF-8: UnicodeDecodeError
    @example(train=b"a.jpg 0\n", names=b"\xc3\x28\n", val=None)
    @example(train=b"a.jpg 0\nb.jpg 99999999999999999999999\n", names=None, val=None)  # OverflowError (int64)
    @example(train=b"a.jpg 0\nb.jpg 1000000000000000\n", names=None, val=None)  # 10**15 classes: MemoryError
    @example(train=b"a.jpg 0\nb.jpg 9223372036854775807\n", names=None, val=None)
    @example(train=b"a/x.jpg 0\nb/y.jpg 1\n", names=None, val=b"v.jpg -9223372036854775808\n")
    def test_never_crashes(self, train, names, val):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            splits = self.load(root, train, names, val)
            if splits is None:
                return
            check_consistent(splits)
            assert all(item.startswith(str(root)) for item in splits.train.items)
            assert len(splits.train) == sum(1 for ln in io_lines(train) if ln.strip())  # one item per line
            if names is not None:
                n_names = sum(1 for ln in io_lines(names) if ln.strip())
                assert splits.num_classes == n_names

    def test_errors_name_the_line(self, tmp_path):
        for train, line in ((b"a.jpg 0\nb.jpg 1\n\xff.jpg 1\n", 3), (b"a.jpg 0\nb.jpg 1\n\nc.jpg " + b"9" * 30, 4)):
            path = tmp_path / "train.txt"
            path.write_bytes(train)
            with pytest.raises(DataFormatError, match=rf"train\.txt, line {line}\b"):
                AnnotationListSource(root=str(tmp_path), train_list="train.txt").load()

    def test_huge_label_without_names_file_is_fast_and_clear(self, tmp_path):
        (tmp_path / "train.txt").write_text("a/x.jpg 0\nb/y.jpg 5000000000000\n")
        with pytest.raises(DataFormatError, match=r"train\.txt, line 2: label 5000000000000 is outside \[0, 1\)"):
            AnnotationListSource(root=str(tmp_path), train_list="train.txt").load()


def io_lines(data: bytes) -> list[str]:
    return io.StringIO(data.decode("utf-8"), newline=None).readlines()


# ------------------------------------------------------------------------------ iNaturalist json

_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-(2**70), 2**70),
                    st.floats(allow_nan=True), st.text(max_size=6))
_json = st.recursive(_scalar, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)
_id = st.one_of(st.integers(0, 4), st.integers(0, 4).map(str), st.integers(0, 4).map(float), _json)


@st.composite
def coco(draw):
    """A valid COCO-style dict, then a few random mutations (wrong types, missing keys...)."""
    n_cats = draw(st.integers(1, 4))
    cat_ids = draw(st.lists(st.integers(-3, 10**12), min_size=n_cats, max_size=n_cats, unique=True))
    n_images = draw(st.integers(n_cats, n_cats + 4))
    images = [{"id": i + 1, "file_name": f"train_val2018/{i}.jpg"} for i in range(n_images)]
    anns = [{"image_id": i + 1, "category_id": cat_ids[i % n_cats]} for i in range(n_images)]
    cats = [{"id": c, "name": f"species {c}"} for c in cat_ids]
    data = {"images": images, "annotations": anns, "categories": cats}
    for _ in range(draw(st.integers(0, 3))):
        section = draw(st.sampled_from(["images", "annotations", "categories"]))
        records = data.get(section)
        if not isinstance(records, list):
            continue  # replaced or dropped by an earlier mutation
        rec = records[draw(st.integers(0, len(records) - 1))] if records else None
        kind = draw(st.integers(0, 5))
        if kind == 0:  # replace a field value
            if isinstance(rec, dict) and rec:
                rec[draw(st.sampled_from(sorted(rec)))] = draw(_id)
        elif kind == 1:  # drop a field
            if isinstance(rec, dict) and rec:
                del rec[draw(st.sampled_from(sorted(rec)))]
        elif kind == 2:  # replace a whole record
            if records:
                records[draw(st.integers(0, len(records) - 1))] = draw(_json)
        elif kind == 3:  # append a random record
            records.append(draw(st.dictionaries(st.sampled_from(["id", "image_id", "category_id", "file_name",
                                                                  "name"]), _id, max_size=3)))
        elif kind == 4:  # replace the whole section
            data[section] = draw(_json)
        else:  # drop the section
            del data[section]
    return data


def _json_file():
    return st.one_of(
        coco().map(lambda d: json.dumps(d).encode()),
        coco().map(lambda d: json.dumps(d, ensure_ascii=False).encode("utf-8", "surrogatepass")),
        _json.map(lambda d: json.dumps(d).encode()),  # non-dict top level and random structures
        st.tuples(coco().map(lambda d: json.dumps(d).encode()), st.integers(0, 200), st.binary(max_size=4)).map(
            lambda t: t[0][:t[1]] + t[2] + t[0][t[1]:]),  # stray bytes spliced in
        st.binary(max_size=80),
    )


class TestINatJson:
    @FUZZ
    @given(train=_json_file(), test=st.none() | _json_file())
    @example(train=b'{"images": [], "annotations": [], "categories": [{"id": [1], "name": "x"}]}', test=None)
    @example(train=b'{"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}, {"id": "2", '
                   b'"name": "b"}]}', test=None)  # sorted() of int and str: TypeError
    @example(train=b'{"images": [{"id": {"a": 1}, "file_name": "x"}], "annotations": [], "categories": []}',
             test=None)
    @example(train=b'{"images": [{"id": 1, "file_name": "x"}], "annotations": [{"image_id": [1], '
                   b'"category_id": 1}], "categories": [{"id": 1, "name": "a"}]}', test=None)
    @example(train=b'{"images": [{"id": 1, "file_name": null}], "annotations": [{"image_id": 1, '
                   b'"category_id": 1}], "categories": [{"id": 1, "name": "a"}]}', test=None)
    @example(train=b'{"images": \xff[]}', test=None)  # UnicodeDecodeError
    @example(train=b"[" * 100_000, test=None)  # RecursionError
    @example(train=b'{"images": [' + b"1" * 5000 + b"]}", test=None)  # int digit limit: a plain ValueError
    def test_never_crashes(self, train, test):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            (root / "train.json").write_bytes(train)
            files = [root / "train.json"]
            if test is not None:
                (root / "test.json").write_bytes(test)
                files.append(root / "test.json")
            src = INatJsonSource(root=str(root), train_json="train.json",
                                 test_json="test.json" if test is not None else None)
            splits = outcome(src.load, *files)
            if splits is None:
                return
            check_consistent(splits)
            data = json.loads(train)
            assert splits.num_classes == len({c["id"] for c in data["categories"]})
            assert all(isinstance(f, str) for f in splits.train.items)

    def test_valid_file_loads(self, tmp_path):
        data = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
                "annotations": [{"image_id": 1, "category_id": 7}, {"image_id": 2, "category_id": 3}],
                "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}]}
        (tmp_path / "train.json").write_text(json.dumps(data))
        s = INatJsonSource(root=str(tmp_path), train_json="train.json", test_json=None).load()
        assert s.class_names == ["three", "seven"] and s.train.labels.tolist() == [1, 0]


# ------------------------------------------------------------------------------ IDX / Fashion-MNIST

_DTYPE_CODES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    array = np.asarray(array, dtype=_DTYPE_CODES[code])
    return bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


@st.composite
def idx_file(draw):
    """A well-formed IDX file half of the time; else one flaw: random bytes, a bad magic, many or
    huge dims (products past 2**64 included), a cut header or a payload of the wrong length."""
    flaw = draw(st.sampled_from(["none"] * 5 + ["bytes", "magic", "ndim", "huge", "header", "payload"]))
    if flaw == "bytes":
        return draw(st.binary(max_size=64))
    code = draw(st.sampled_from(sorted(_DTYPE_CODES)))
    if flaw == "magic":
        code = draw(st.sampled_from([0x00, 0x07, 0x0A, 0x0F, 0xFF]))
    ndim = draw(st.integers(0, 255) if flaw == "ndim" else st.integers(0, 4))
    dim = st.sampled_from([0, 1, 2**16, 2**31, 2**32 - 1]) if flaw == "huge" else st.integers(0, 4)
    dims = draw(st.lists(dim, min_size=ndim, max_size=ndim))
    header = bytes([0, 0, code, ndim]) + struct.pack(f">{ndim}I", *dims)
    itemsize = np.dtype(_DTYPE_CODES.get(code, np.uint8)).itemsize
    need = math.prod(dims) * itemsize
    size = need if need <= 512 else draw(st.integers(0, 80))
    if flaw == "payload":
        size = draw(st.integers(0, 80).filter(lambda n: n != need))
    if flaw == "header":
        return header[:draw(st.integers(0, len(header) - 1))]
    return header + draw(st.binary(min_size=size, max_size=size))


class TestIDX:
    @FUZZ
    @given(data=idx_file(), gz=st.booleans(), expected_ndim=st.sampled_from([None, None, None, 0, 1, 2, 3]))
    @example(data=bytes([0, 0, 8, 4]) + struct.pack(">4I", *[2**16] * 4), gz=False, expected_ndim=None)  # 2**64
    @example(data=bytes([0, 0, 8, 3]) + struct.pack(">3I", 0, 2**32 - 1, 2**32 - 1), gz=False, expected_ndim=3)
    @example(data=bytes([0, 0, 8, 3]) + struct.pack(">3I", 2**32 - 1, 2**32 - 1, 2**32 - 1) + b"\0" * 9,
             gz=True, expected_ndim=3)
    def test_read_idx(self, data, gz, expected_ndim):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / ("x.idx.gz" if gz else "x.idx")
            path.write_bytes(gzip.compress(data) if gz else data)
            array = outcome(lambda: read_idx(path, expected_ndim=expected_ndim), path)
            if array is None:
                return
            assert array.ndim == data[3] and (expected_ndim is None or array.ndim == expected_ndim)
            assert array.dtype == np.dtype(_DTYPE_CODES[data[2]])
            assert array.nbytes == len(data) - 4 - 4 * data[3]
            assert bytes(array.tobytes()) == data[4 + 4 * data[3]:]

    def test_huge_declared_size_reads_little(self, tmp_path):
        """The declared size is checked against the file before the payload is read."""
        plain = tmp_path / "sparse-images-idx3-ubyte"
        with open(plain, "wb") as fh:  # declares 2x2x2 but is 64 MB (sparse file)
            fh.write(bytes([0, 0, 8, 3]) + struct.pack(">3I", 2, 2, 2))
            fh.truncate(64 << 20)
        packed = tmp_path / "bomb-images-idx3-ubyte.gz"  # 64 MB of zeros, 64 KB compressed
        packed.write_bytes(gzip.compress(bytes([0, 0, 8, 3]) + struct.pack(">3I", 2, 2, 2) + bytes(64 << 20), 1))
        huge = tmp_path / "huge-images-idx3-ubyte"
        huge.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">3I", *[2**32 - 1] * 3) + b"\0" * 27)
        for path in (plain, packed, huge):
            tracemalloc.start()
            try:
                with pytest.raises(DataFormatError, match=str(path.name)):
                    read_idx(path, expected_ndim=3)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert peak < 8 << 20, f"{path.name}: read {peak} bytes"

    def test_corrupt_gzip_stream(self, tmp_path):
        good = gzip.compress(bytes([0, 0, 8, 1]) + struct.pack(">I", 300) + bytes(range(256)) + bytes(44))
        bad = tmp_path / "labels.gz"
        bad.write_bytes(good[:12] + bytes(b ^ 0x5A for b in good[12:-8]) + good[-8:])  # zlib.error inside
        with pytest.raises(DataFormatError, match=r"labels\.gz: cannot read IDX file"):
            read_idx(bad)
        extra = tmp_path / "extra.gz"
        extra.write_bytes(gzip.compress(bytes([0, 0, 8, 1]) + struct.pack(">I", 2) + b"\1\2\3"))
        with pytest.raises(DataFormatError, match=r"extra\.gz: IDX payload has more than 2 bytes"):
            read_idx(extra)


@st.composite
def fashion_dir(draw):
    """Four IDX files: well-formed half of the time, else with one flaw (a missing class, a label
    out of range, non-integer labels, other pixel types, empty or mismatched image sizes, counts
    that disagree, a damaged file)."""
    flaw = draw(st.sampled_from(["none"] * 6 + ["classes", "label", "label_dtype", "image_dtype", "empty_size",
                                              "sizes", "count", "damage"]))
    h, w = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    files = {}
    for prefix in ("train", "t10k"):
        n_classes = draw(st.integers(1, 9)) if flaw == "classes" else 10
        n = draw(st.integers(n_classes, 3 * n_classes) if prefix == "train" else st.integers(0, 20))
        labels = np.array([i % n_classes for i in range(n)], dtype=np.int64)
        label_code = 0x08
        if flaw == "label" and n:
            labels[draw(st.integers(0, n - 1))] = draw(st.sampled_from([10, 11, 255]))
        if flaw == "label_dtype":
            label_code = draw(st.sampled_from([0x09, 0x0B, 0x0C, 0x0D, 0x0E]))
            if n and label_code == 0x09:
                labels[0] = -1
        image_code = draw(st.sampled_from([0x09, 0x0B, 0x0D])) if flaw == "image_dtype" else 0x08
        size = (h, w)
        if flaw == "empty_size":
            size = draw(st.sampled_from([(0, w), (h, 0), (0, 0)]))
        if flaw == "sizes" and prefix == "t10k":
            size = (h + 1, w)
        n_images = n + (draw(st.sampled_from([-1, 1])) if flaw == "count" and n else 0)
        pixels = draw(st.integers(0, 255))
        files[f"{prefix}-images-idx3-ubyte"] = idx_bytes(np.full((n_images, *size), pixels), image_code)
        files[f"{prefix}-labels-idx1-ubyte"] = idx_bytes(labels, label_code)
    if flaw == "damage":
        name = draw(st.sampled_from(sorted(files)))
        data = files[name]
        cut = draw(st.integers(0, len(data)))
        files[name] = data[:cut] + draw(st.binary(max_size=6))
    gz = draw(st.booleans())
    return files, gz


class TestFashionMNIST:
    @FUZZ
    @given(spec=fashion_dir(), imbalance=st.sampled_from([None, None, 1.0, 2.0]), val=st.sampled_from([0, 0, 1]),
           test_cap=st.sampled_from([None, None, 1]))
    @example(spec=({"train-images-idx3-ubyte": idx_bytes(np.zeros((10, 2, 2))),
                    "train-labels-idx1-ubyte": idx_bytes(np.arange(10)),
                    "t10k-images-idx3-ubyte": idx_bytes(np.zeros((10, 3, 3))),
                    "t10k-labels-idx1-ubyte": idx_bytes(np.arange(10))}, False),
             imbalance=None, val=0, test_cap=None)  # train 2x2, test 3x3: np.concatenate ValueError
    @example(spec=({"train-images-idx3-ubyte": idx_bytes(np.zeros((5, 2, 2))),
                    "train-labels-idx1-ubyte": idx_bytes(np.arange(5)),
                    "t10k-images-idx3-ubyte": idx_bytes(np.zeros((1, 2, 2))),
                    "t10k-labels-idx1-ubyte": idx_bytes([0])}, False),
             imbalance=None, val=0, test_cap=None)  # classes 5..9 have no training image
    @example(spec=({"train-images-idx3-ubyte": idx_bytes(np.zeros((10, 2, 2))),
                    "train-labels-idx1-ubyte": idx_bytes(np.arange(10) + 0.5, 0x0D),
                    "t10k-images-idx3-ubyte": idx_bytes(np.zeros((1, 2, 2))),
                    "t10k-labels-idx1-ubyte": idx_bytes([0])}, False),
             imbalance=None, val=0, test_cap=None)  # float labels would be truncated silently
    def test_never_crashes(self, spec, imbalance, val, test_cap):
        files, gz = spec
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            for name, data in files.items():
                if gz:
                    (root / f"{name}.gz").write_bytes(gzip.compress(data, 1))
                else:
                    (root / name).write_bytes(data)
            src = FashionMNISTSource(root=str(root), imbalance_ratio=imbalance, val_per_class=val,
                                     max_test_per_class=test_cap)
            splits = outcome(src.load, *(root / name for name in files))
            if splits is None:
                return
            check_consistent(splits, file_items=False)
            assert splits.class_names == FASHION_MNIST_CLASSES
            images = splits.images
            assert images.ndim == 3 and images.dtype == np.uint8
            n_train = len(read_idx(root / ("train-labels-idx1-ubyte" + (".gz" if gz else ""))))
            assert all(0 <= i < n_train for i in splits.train.items)
            assert all(n_train <= i < len(images) for i in splits.test.items)
            if splits.val is not None:
                assert not set(splits.val.items) & set(splits.train.items)


def test_fuzz_settings_are_deterministic():
    """CI stability: the fuzz tests are derandomized and keep no example database."""
    assert FUZZ.derandomize and FUZZ.database is None and FUZZ.deadline is None
