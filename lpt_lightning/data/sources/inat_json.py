"""iNaturalist 2018 style COCO json (``images``, ``annotations``, ``categories``)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from lpt_lightning.data.sources.base import (
    DatasetSplits,
    DataSource,
    Split,
    check_no_empty_class,
    require_dir,
    require_file,
    resolve_path,
)
from lpt_lightning.errors import DataFormatError
from lpt_lightning.taxonomy import Taxonomy


def _load_coco_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8-sig") as fh:  # -sig: a byte-order mark is not an error
            data = json.load(fh)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, too many digits, nesting
        raise DataFormatError(f"{path}: invalid JSON ({str(exc)[:200]})") from None
    if not isinstance(data, dict):
        raise DataFormatError(f"{path}: expected a JSON object with 'images', 'annotations', 'categories'")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DataFormatError(f"{path}: missing top-level key {key!r}")
        if not isinstance(data[key], list):
            raise DataFormatError(f"{path}: {key!r} must be a list")
    return data


def _get(record: dict, key: str, path: Path, what: str, pos: int):
    try:
        return record[key]
    except (KeyError, TypeError):
        raise DataFormatError(f"{path}: {what}[{pos}] is missing key {key!r}: {str(record)[:200]}") from None


def _get_id(record: dict, key: str, path: Path, what: str, pos: int) -> int | str:
    value = _get(record, key, path, what, pos)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DataFormatError(f"{path}: {what}[{pos}][{key!r}] must be an integer or a string, got {str(value)[:200]}")
    return value


class INatJsonSource(DataSource):
    """iNaturalist 2018 style COCO json (``images``, ``annotations``, ``categories``).

    Category ids may be non-contiguous: the sorted ids of the training json map to 0..C-1.
    iNat's official val set is the benchmark's *test* set, so there is no validation split
    unless ``val_json`` names one: the DataModule then carves a held-out split out of train
    (``data.holdout_per_class``); the test json never doubles as validation.

    Class names come from the training json's ``categories``, or from ``names_json`` where it is
    set: iNaturalist 2018's ``train2018.json`` names each category by its id ("0", "1", ...), and
    the species names were published separately in ``categories.json`` (a list of ``id``/``name``
    records, or a json object with such a ``categories`` list). Where those records carry the
    taxonomy (kingdom ... genus, as iNat 2018's do), evaluation adds the accuracy at each level
    (`lpt_lightning.taxonomy`) and the per-class plot groups classes by ``supercategory``.
    """

    def __init__(
        self,
        root: str,
        train_json: str = "train2018.json",
        test_json: str | None = "val2018.json",
        val_json: str | None = None,
        name: str = "inat2018",
        names_json: str | None = None,
    ) -> None:
        self.root = root
        self.train_json = train_json
        self.test_json = test_json
        self.val_json = val_json
        self.name = name
        self.names_json = names_json

    def _split(self, path: Path, data: dict, id_to_class: dict, root: Path) -> Split:
        file_of = {}
        for pos, img in enumerate(data["images"]):
            file_name = _get(img, "file_name", path, "images", pos)
            if not isinstance(file_name, str) or not file_name:
                raise DataFormatError(f"{path}: images[{pos}]['file_name'] must be a path, got {str(file_name)[:200]}")
            file_of[_get_id(img, "id", path, "images", pos)] = (file_name, pos)
        label_of: dict = {}
        for pos, ann in enumerate(data["annotations"]):
            image_id = _get_id(ann, "image_id", path, "annotations", pos)
            cat = _get_id(ann, "category_id", path, "annotations", pos)
            if image_id not in file_of:
                raise DataFormatError(f"{path}: annotations[{pos}] refers to unknown image_id {image_id!r}")
            if cat not in id_to_class:
                raise DataFormatError(
                    f"{path}: annotations[{pos}] has category_id {cat!r}, which is not a category of {self.train_json}"
                )
            if image_id in label_of:
                raise DataFormatError(f"{path}: image_id {image_id!r} has more than one annotation (annotations[{pos}])")
            label_of[image_id] = id_to_class[cat]
        # Images are kept in the json's order; unlabeled images (e.g. a challenge test set) are skipped.
        items, labels, positions = [], [], []
        for image_id, (file_name, pos) in file_of.items():
            if image_id in label_of:
                items.append(str(root / file_name.lstrip("/")))
                labels.append(label_of[image_id])
                positions.append(pos)
        if not items:
            raise DataFormatError(f"{path}: no annotated images")
        return Split(items, np.asarray(labels, dtype=np.int64), origin=str(path), positions=np.asarray(positions),
                     position_format="images[{}]")

    def _names_from_file(self, path: Path, ids: list, train_path: Path) -> tuple[dict, dict]:
        """``{category id: name}`` from ``names_json`` for every category of the training json, and
        ``{category id: record}``."""
        require_file(path, "data.source.init_args.names_json")
        try:
            with open(path, encoding="utf-8-sig") as fh:
                data = json.load(fh)
        except (ValueError, RecursionError) as exc:
            raise DataFormatError(f"{path}: invalid JSON ({str(exc)[:200]})") from None
        cats = data.get("categories") if isinstance(data, dict) else data
        if not isinstance(cats, list):
            raise DataFormatError(f"{path}: expected a list of categories ({{'id': ..., 'name': ...}}) or a json "
                                  "object with a 'categories' list (data.source.init_args.names_json)")
        names, records = _category_table(cats, path)
        missing = [cid for cid in ids if cid not in names]
        if missing:
            raise DataFormatError(f"{path}: no name for {len(missing)} of the {len(ids)} category ids of {train_path}, "
                                  f"e.g. {missing[:5]}; data.source.init_args.names_json must name every category")
        return names, records

    def load(self) -> DatasetSplits:
        root = Path(os.path.expanduser(self.root))
        require_dir(root, "data.source.init_args.root")
        train_path = resolve_path(self.train_json, root)
        require_file(train_path, "data.source.init_args.train_json")
        train_data = _load_coco_json(train_path)
        cat_name, cat_record = _category_table(train_data["categories"], train_path)
        if not cat_name:
            raise DataFormatError(f"{train_path}: 'categories' is empty")
        try:
            sorted_ids = sorted(cat_name)
        except TypeError:
            raise DataFormatError(f"{train_path}: category ids mix integers and strings; use one type") from None
        id_to_class = {cid: i for i, cid in enumerate(sorted_ids)}
        categories_path = train_path
        if self.names_json is not None:
            categories_path = resolve_path(self.names_json, root)
            cat_name, cat_record = self._names_from_file(categories_path, sorted_ids, train_path)
        taxonomy = Taxonomy.from_categories(cat_record, sorted_ids, categories_path)
        class_names = [cat_name[cid] for cid in sorted_ids]
        train = self._split(train_path, train_data, id_to_class, root)
        check_no_empty_class(train.labels, len(class_names), str(train_path), class_names)

        def optional(rel: str | None, option: str) -> Split | None:
            if rel is None:
                return None
            path = resolve_path(rel, root)
            require_file(path, option)
            return self._split(path, _load_coco_json(path), id_to_class, root)

        test = optional(self.test_json, "data.source.init_args.test_json")
        val = optional(self.val_json, "data.source.init_args.val_json")
        return DatasetSplits(self.name, train=train, val=val, test=test, class_names=class_names, taxonomy=taxonomy)


def _category_table(cats: list, path: Path) -> tuple[dict, dict]:
    """``{id: name}`` and ``{id: record}`` of a categories list; a repeated id is an error naming it."""
    names: dict = {}
    records: dict = {}
    for pos, cat in enumerate(cats):
        cid = _get_id(cat, "id", path, "categories", pos)
        if cid in names:
            raise DataFormatError(f"{path}: categories[{pos}] repeats category id {cid!r}")
        names[cid] = str(_get(cat, "name", path, "categories", pos))
        records[cid] = cat
    return names, records
