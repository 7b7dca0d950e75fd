"""Reading a prepared copy of a dataset (written by ``lpt prepare``, see `lpt_lightning.prepare`).

A prepared root holds ``manifest.json`` (written last: its presence means the copy is complete),
one ``<split>.items.json`` per split (the source's item order, labels and relative paths) and the
images, either as LitData shards (``parts/<split>/<part>/``, one LitData dataset per part) or as a
resized tree with the source's relative paths (``images/<relative path>``).

`PreparedSource` returns the same split names, item order, labels and class names as the source
it was made from, so the DataModule's held-out carving, samplers and per-draw augmentation pick
exactly the same images as on the raw files.
"""
from __future__ import annotations

import bisect
import json
import os
from pathlib import Path

import numpy as np

from lpt_lightning.checkpoints.files import atomic_save
from lpt_lightning.data.sources import DatasetSplits, DataSource, Split
from lpt_lightning.errors import DataFormatError
from lpt_lightning.taxonomy import Taxonomy

FORMAT_VERSION = 1
FORMATS = ("litdata", "tree")
SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
PLAN = "plan.json"  # written first: a root with a plan and no manifest is an interrupted prepare


def items_file(root: Path, split: str) -> Path:
    return root / f"{split}.items.json"


def part_path(root: Path, split: str, part: int) -> Path:
    """A LitData dataset directory (litdata format) or an empty marker file (tree format)."""
    return root / "parts" / split / f"{part:05d}"


def tree_path(root: Path, relative: str) -> Path:
    return root / "images" / relative


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataFormatError(f"{path}: cannot read ({exc}); rerun lpt prepare into a fresh --output") from None


def write_json_atomic(path: Path, data: dict) -> None:
    """A JSON file that a kill never leaves half-written."""
    atomic_save(lambda tmp: tmp.write_text(json.dumps(data, indent=1), encoding="utf-8"), path)


class ShardReader:
    """``reader[i]`` is the stored encoded image ``i`` (bytes) of LitData datasets read in sequence.

    Picklable and lazy: each process (DataLoader worker, DDP rank) opens a part's
    `litdata.StreamingDataset` on its first access there. Only random access by index is used:
    our samplers choose the items, so LitData never shuffles or shards, and a local directory is
    read in place (LitData copies only remote or compressed datasets into a cache).
    """

    def __init__(self, parts: list[str], counts: list[int]) -> None:
        self.parts = list(parts)
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64).tolist()
        self._opened: dict[int, object] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self.starts[-1]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_opened": {}, "_pid": None}

    def _part(self, p: int):
        if self._pid != os.getpid():  # a forked worker must not share the parent's memory maps
            self._opened, self._pid = {}, os.getpid()
        if p not in self._opened:
            from litdata import StreamingDataset

            # batch_decode=0 reads one item per access; LitData's default decodes a window of 256
            # items around it (made for sequential streaming): 35x slower random access.
            self._opened[p] = StreamingDataset(self.parts[p], batch_decode=0)
        return self._opened[p]

    def __getitem__(self, i: int) -> bytes:
        if not 0 <= i < len(self):
            raise IndexError(f"prepared image {i} out of range [0, {len(self)})")
        p = bisect.bisect_right(self.starts, i) - 1
        return bytes(self._part(p)[i - self.starts[p]]["image"])


def _part_count(path: Path) -> int:
    """Items of one LitData part, from its index.json (its chunk files must all be there)."""
    index = read_json(path / "index.json")
    for chunk in index.get("chunks", []):
        if not (path / chunk["filename"]).is_file():
            raise DataFormatError(f"{path}: chunk {chunk['filename']} is missing; rerun lpt prepare into a fresh "
                                  "--output (the prepared copy was damaged after it was written)")
    return sum(int(chunk["chunk_size"]) for chunk in index.get("chunks", []))


class PreparedSource(DataSource):
    """A dataset prepared by ``lpt prepare`` (resized images as LitData shards or as a file tree).

    Args:
        root: the ``--output`` directory of ``lpt prepare``.
        short_side: if set, the shorter image side the copy must have been prepared with (a config
            written for 256-px data refuses a copy prepared at another size).
    """

    def __init__(self, root: str, short_side: int | None = None) -> None:
        self.root = root
        self.short_side = short_side
        self.name = "prepared"

    def manifest(self) -> dict:
        """The checked manifest; DataFormatError naming it and what to do when it is missing,
        incomplete or does not match the files."""
        root = Path(os.path.expanduser(self.root))
        path = root / MANIFEST
        rerun = "rerun the same `lpt prepare` command to finish it"
        if not path.is_file():
            if (root / PLAN).is_file():
                plan = read_json(root / PLAN)
                done = sum(1 for s, info in plan["splits"].items() for p in range(info["parts"])
                           if part_path(root, s, p).exists())
                total = sum(info["parts"] for info in plan["splits"].values())
                raise DataFormatError(f"{path} does not exist: the prepared copy in {root} is incomplete ({done} of "
                                      f"{total} parts written; lpt prepare was interrupted): {rerun}")
            raise DataFormatError(f"{path} does not exist: {root} is not a prepared dataset; write one with "
                                  f"`lpt prepare --config CONFIG --output {root}` or fix data.source.init_args.root")
        manifest = read_json(path)
        if manifest.get("format_version") != FORMAT_VERSION or manifest.get("format") not in FORMATS:
            raise DataFormatError(f"{path}: format {manifest.get('format')!r} version {manifest.get('format_version')!r}"
                                  f" is not one this lpt_lightning reads (version {FORMAT_VERSION}, {'/'.join(FORMATS)});"
                                  " prepare the dataset again with this version")
        prepared_at = manifest["settings"]["short_side"]
        if self.short_side is not None and prepared_at != self.short_side:
            raise DataFormatError(f"{path}: prepared with --short_side {prepared_at}, but data.source.init_args."
                                  f"short_side is {self.short_side}; prepare it again or change the config")
        return manifest

    def _split(self, root: Path, manifest: dict, name: str) -> Split:
        info = manifest["splits"][name]
        stored = read_json(items_file(root, name))
        paths, labels = stored["paths"], np.asarray(stored["labels"], dtype=np.int64)
        items = [str(tree_path(root, p)) for p in paths]
        split = Split(items, labels, origin=f"{stored['origin']} (prepared copy in {root})",
                      positions=stored["positions"], position_format=stored["position_format"])
        # The digest counts paths relative to their common folder: the tree's paths give the source's.
        if len(split) != info["count"] or split.digest() != info["digest"]:
            raise DataFormatError(f"{items_file(root, name)} does not match {root / MANIFEST} ({len(split)} items, "
                                  f"digest {split.digest()}; the manifest records {info['count']}, {info['digest']}): "
                                  "the copy was changed after lpt prepare wrote it; prepare it again")
        return split

    def load(self) -> DatasetSplits:
        manifest = self.manifest()
        root = Path(os.path.expanduser(self.root))
        names = [s for s in SPLITS if s in manifest["splits"]]
        splits = {s: self._split(root, manifest, s) for s in names}
        images = None
        if manifest["format"] == "litdata":
            parts, counts, start = [], [], 0
            for s in names:
                info = manifest["splits"][s]
                paths = [part_path(root, s, p) for p in range(info["parts"])]
                missing = [p for p in paths if not (p / "index.json").is_file()]
                if missing:
                    raise DataFormatError(f"{missing[0]} is missing ({len(missing)} parts of split {s}) although "
                                          f"{root / MANIFEST} lists it; prepare the dataset again")
                n = [_part_count(p) for p in paths]
                if sum(n) != info["count"]:
                    raise DataFormatError(f"{root / 'parts' / s}: {sum(n)} images in its parts, {root / MANIFEST} "
                                          f"records {info['count']}; prepare the dataset again")
                parts += [str(p) for p in paths]
                counts += n
                # Integer items index the one reader over all splits, as an in-memory source's do.
                splits[s] = Split(list(range(start, start + len(splits[s]))), splits[s].labels,
                                  origin=splits[s].origin, positions=splits[s].positions,
                                  position_format=splits[s].position_format)
                start += len(splits[s])
            images = ShardReader(parts, counts)
        self.name = manifest["name"]
        return DatasetSplits(manifest["name"], train=splits["train"], val=splits.get("val"), test=splits.get("test"),
                             class_names=list(manifest["class_names"]), images=images,
                             taxonomy=Taxonomy.from_record(manifest.get("taxonomy")))
