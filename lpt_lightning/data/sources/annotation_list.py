"""Places-LT / ImageNet-LT style list files: ``relative/path.jpg label`` per line."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lpt_lightning.data.sources.base import (
    DatasetSplits,
    DataSource,
    Split,
    check_no_empty_class,
    read_lines,
    require_dir,
    require_file,
    resolve_path,
)
from lpt_lightning.errors import DataFormatError


def _gapless_label_count(labels: np.ndarray) -> int:
    """C such that 0..C-1 all occur in ``labels`` and C does not (no allocation of max(labels))."""
    present = np.unique(labels[labels >= 0])
    gaps = np.flatnonzero(present != np.arange(present.size))
    return int(gaps[0]) if gaps.size else int(present.size)


def _parse_list_file(path: Path) -> tuple[list[str], np.ndarray, list[int]]:
    """Lines ``relative/path.jpg label`` -> (paths, labels, line numbers). Blank lines skipped.

    The label is the last field: everything before it is the path, which may contain spaces."""
    paths, labels, line_nos = [], [], []
    for line_no, raw in enumerate(read_lines(path), start=1):
        line = raw.strip()
        if not line:
            continue
        fields = line.rsplit(maxsplit=1)
        if len(fields) != 2:
            raise DataFormatError(
                f"{path}, line {line_no}: expected 'relative/path.jpg label' (a path, then the label), "
                f"got {line!r}"
            )
        try:
            label = int(fields[1])
        except ValueError:
            raise DataFormatError(
                f"{path}, line {line_no}: label {fields[1]!r} is not an integer: {line!r}"
            ) from None
        if not -(2**63) <= label < 2**63:
            raise DataFormatError(f"{path}, line {line_no}: label {fields[1]!r} is out of range: {line!r}")
        # Places-LT writes paths as '/a/airfield/x.jpg': they are relative to root anyway.
        paths.append(fields[0].lstrip("/"))
        labels.append(label)
        line_nos.append(line_no)
    if not paths:
        raise DataFormatError(f"{path}: no annotation lines found")
    return paths, np.asarray(labels, dtype=np.int64), line_nos


def parse_class_names(path: Path) -> list[str]:
    """One class per line: ``name`` (index = line order) or ``name index``.

    Places-style names ``/a/apartment_building/outdoor 8`` drop the one-letter alphabetical
    bucket directory and keep the rest (``apartment_building/outdoor``): the last component
    alone would make many classes collide ("outdoor", "indoor").
    """
    lines = [(n, raw.strip()) for n, raw in enumerate(read_lines(path), start=1) if raw.strip()]
    if not lines:
        raise DataFormatError(f"{path}: class names file is empty")

    def split_index(line: str) -> tuple[str, int] | None:
        parts = line.rsplit(maxsplit=1)
        if len(parts) == 2:
            try:
                return parts[0], int(parts[1])
            except ValueError:
                return None
        return None

    indexed = [split_index(line) for _, line in lines]
    if all(x is not None for x in indexed):
        names: list[str | None] = [None] * len(lines)
        for (line_no, line), (name, idx) in zip(lines, indexed):
            if not 0 <= idx < len(lines) or names[idx] is not None:
                raise DataFormatError(
                    f"{path}, line {line_no}: class index {idx} is out of range or repeated "
                    f"(expected each of 0..{len(lines) - 1} once): {line!r}"
                )
            names[idx] = name
        raw_names = [str(n) for n in names]
    else:
        raw_names = [line for _, line in lines]
    return [_clean_class_path(n) for n in raw_names]


def _clean_class_path(name: str) -> str:
    parts = [p for p in name.strip("/").split("/") if p]
    if len(parts) > 1 and len(parts[0]) == 1:  # Places '/a/...' alphabetical bucket
        parts = parts[1:]
    return "/".join(parts) if parts else name


def _names_from_dirs(paths: list[str], labels: np.ndarray, num_classes: int) -> list[str]:
    """Class i is named after the common parent directory of its train images, else class_i.

    The name is the parent's last component, extended by further components only where
    that would collide (Places' many ".../indoor" and ".../outdoor" leaves).
    """
    parents: list[set[str]] = [set() for _ in range(num_classes)]
    for p, y in zip(paths, labels):
        parents[y].add(os.path.dirname(p))
    comps: list[list[str] | None] = []
    for dirs in parents:
        parent = next(iter(dirs)) if len(dirs) == 1 else ""
        parts = _clean_class_path(parent).split("/") if parent else []
        comps.append(parts or None)
    depth = [1] * num_classes
    while True:
        names = ["/".join(c[-d:]) if c else f"class_{i}" for i, (c, d) in enumerate(zip(comps, depth))]
        seen: dict[str, list[int]] = {}
        for i, n in enumerate(names):
            seen.setdefault(n, []).append(i)
        grow = [i for same in seen.values() if len(same) > 1 for i in same if comps[i] and depth[i] < len(comps[i])]
        if not grow:
            break
        for i in grow:
            depth[i] += 1
    # Whatever still collides (identical parent paths) would be ambiguous: use generic names.
    return [n if len(seen[n]) == 1 else f"class_{i}" for i, n in enumerate(names)]


class AnnotationListSource(DataSource):
    """Places-LT / ImageNet-LT style list files (``relative/path.jpg label`` per line).

    Args:
        root: image root; image paths in the lists are relative to it.
        train_list: training list file (absolute or relative to root).
        val_list: optional validation list.
        test_list: optional test list.
        class_names_file: optional file with one class per line (``name`` or ``name index``).
        name: dataset name used in summaries and logs.
    """

    def __init__(
        self,
        root: str,
        train_list: str,
        val_list: str | None = None,
        test_list: str | None = None,
        class_names_file: str | None = None,
        name: str = "annotation_list",
    ) -> None:
        self.root = root
        self.train_list = train_list
        self.val_list = val_list
        self.test_list = test_list
        self.class_names_file = class_names_file
        self.name = name

    def load(self) -> DatasetSplits:
        root = Path(os.path.expanduser(self.root))
        require_dir(root, "data.source.init_args.root")
        files = {"train": self.train_list, "val": self.val_list, "test": self.test_list}
        parsed = {}
        for split_name, rel in files.items():
            if rel is None:
                continue
            path = resolve_path(rel, root)
            require_file(path, f"data.source.init_args.{split_name}_list")
            parsed[split_name] = (path, *_parse_list_file(path))

        train_path, train_paths, train_labels, _ = parsed["train"]
        if self.class_names_file is not None:
            names_path = resolve_path(self.class_names_file, root)
            require_file(names_path, "data.source.init_args.class_names_file")
            class_names = parse_class_names(names_path)
        else:
            class_names = None
        if class_names is not None:
            num_classes = len(class_names)
            why = f"{num_classes} classes in {self.class_names_file}"
        else:
            # Without a names file the classes are 0..C-1, the training labels present without a gap:
            # a stray label (a typo like 70 for 7) is then reported where it is written.
            num_classes = _gapless_label_count(train_labels)
            why = (f"no class_names_file: the classes are taken to be 0..{num_classes - 1}, the training labels "
                   "present without a gap; set data.source.init_args.class_names_file if there are more")

        for split_name, (path, _, labels, line_nos) in parsed.items():
            bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
            if bad.size:
                i = int(bad[0])
                more = f"; {bad.size - 1} more such lines" if bad.size > 1 else ""
                raise DataFormatError(
                    f"{path}, line {line_nos[i]}: label {int(labels[i])} is outside [0, {num_classes}) ({why}){more}"
                )

        check_no_empty_class(train_labels, num_classes, str(train_path), class_names)
        if class_names is None:
            class_names = _names_from_dirs(train_paths, train_labels, num_classes)

        def to_split(split_name: str) -> Split | None:
            if split_name not in parsed:
                return None
            path, rel_paths, labels, line_nos = parsed[split_name]
            return Split([str(root / p) for p in rel_paths], labels, origin=str(path), positions=line_nos)

        return DatasetSplits(
            name=self.name,
            train=to_split("train"),
            val=to_split("val"),
            test=to_split("test"),
            class_names=class_names,
        )
