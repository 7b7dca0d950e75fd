"""``lpt prepare``: a prepared copy of a dataset for training at scale (read by `PreparedSource`).

Only prompts, adapters and heads train, so the GPU waits for JPEG decoding of full-size photos.
This decodes every image once, resizes it to a shorter side of ``--short_side`` and writes it as
JPEG, in LitData shards (random access for the class-aware sampler, streamed from a shared file
system by every node) or as a plain tree with the source's relative paths. An image already that
small is copied byte for byte (no generation loss).

Work is cut into parts of ``--part_size`` images. A part is written under a temporary name and
renamed when complete, so a rerun after a kill skips the finished parts and never uses a
half-written one; ``manifest.json`` is written last, and `PreparedSource` refuses a root without it.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import io
import os
import shutil
import sys
import time
from pathlib import Path

import yaml
from PIL import Image
from tqdm import tqdm

from lpt_lightning.checkpoints.files import atomic_save
from lpt_lightning.data.image_checks import DECODE_ERRORS, worker_processes
from lpt_lightning.data.prepared import (
    FORMAT_VERSION,
    FORMATS,
    MANIFEST,
    PLAN,
    SPLITS,
    items_file,
    part_path,
    read_json,
    tree_path,
    write_json_atomic,
)
from lpt_lightning.data.sources import DatasetSplits, DataSource
from lpt_lightning.errors import ConfigError, DataFormatError

CHUNK_BYTES = "64MB"  # LitData chunk file size within a part


def source_from_config(config: str) -> tuple[DataSource, dict]:
    """The ``data.source`` of an ``lpt fit`` or ``lpt pipeline`` YAML, built as jsonargparse builds it."""
    from jsonargparse import ArgumentError, ArgumentParser

    path = Path(config)
    if not path.is_file():
        raise ConfigError(f"--config {config}: no such file")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{config}: invalid YAML ({exc})") from None
    data = cfg.get("data") if isinstance(cfg, dict) else None
    if isinstance(data, str):  # a piece (data: data/inat18.yaml), relative to the config naming it
        piece = path.parent / data
        if not piece.is_file():
            raise ConfigError(f"{config}: data: {data}: no such file ({piece})")
        data = yaml.safe_load(piece.read_text(encoding="utf-8"))
    if isinstance(data, dict) and "init_args" in data:  # data given with its class_path
        data = data["init_args"]
    spec = data.get("source") if isinstance(data, dict) else None
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ConfigError(f"{config}: no data.source with a class_path (the dataset `lpt fit` reads) to prepare")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(DataSource, "source")
    try:
        built = parser.instantiate_classes(parser.parse_object({"source": spec}))
    except ArgumentError as exc:  # an unknown class_path, a misspelt or mistyped init_arg
        raise ConfigError(f"{config}: data.source: {exc}") from None
    return built.source, spec


def relative_paths(splits: dict) -> list[list[str]]:
    """Each split's paths relative to the folder common to all of them (the tree keeps them)."""
    folders = {os.path.dirname(p) for split in splits.values() for p in split.items}
    base = os.path.commonpath(sorted(folders))
    return [[os.path.relpath(p, base) for p in split.items] for split in splits.values()]


def encode_image(path: str, short_side: int, quality: int) -> tuple[bytes | None, str]:
    """(stored bytes, "copied" | "resized"), or (None, why the image cannot be read).

    The shorter side becomes ``short_side``; an image already that small is kept as it is. No EXIF
    rotation, RGB as the raw loader converts it: the copy decodes to what the raw file decodes to.
    """
    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if min(w, h) <= short_side:
                return data, "copied"
            size = (short_side, round(h * short_side / w)) if w <= h else (round(w * short_side / h), short_side)
            img.draft(img.mode, size)  # JPEG: the decoder downscales by 1/2, 1/4 or 1/8 while staying >= size
            img = img.convert("RGB").resize(size, Image.Resampling.LANCZOS)
        out = io.BytesIO()
        img.save(out, format="JPEG", quality=quality)
        return out.getvalue(), "resized"
    except FileNotFoundError:
        return None, "does not exist"
    except DECODE_ERRORS as exc:
        return None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _encode_task(task: tuple[str, int, int]) -> tuple[bytes | None, str]:
    return encode_image(*task)


class _LitDataPart:
    """One part as a LitData dataset, written into a temporary directory renamed when complete."""

    def __init__(self, final: Path) -> None:
        from litdata.streaming.writer import BinaryWriter

        self.final = final
        self.tmp = final.with_name(f".{final.name}.tmp")
        shutil.rmtree(self.tmp, ignore_errors=True)  # left by a killed run
        self.writer = BinaryWriter(str(self.tmp), chunk_bytes=CHUNK_BYTES)
        self.n = 0

    def add(self, data: bytes, label: int, relative: str) -> None:
        self.writer.add_item(self.n, {"image": data, "label": label})
        self.n += 1

    def commit(self) -> None:
        self.writer.done()
        self.writer.merge()
        os.rename(self.tmp, self.final)

    def abandon(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


class _TreePart:
    """One part of the tree: each file written under a temporary name and renamed, then a marker."""

    def __init__(self, final: Path, root: Path) -> None:
        self.final, self.root = final, root

    def add(self, data: bytes, label: int, relative: str) -> None:
        atomic_save(lambda tmp: tmp.write_bytes(data), tree_path(self.root, relative))

    def commit(self) -> None:
        self.final.touch()

    def abandon(self) -> None:
        pass


def _plan(splits: DatasetSplits, present: dict, fmt: str, settings: dict, spec: dict) -> dict:
    part_size = settings["part_size"]
    return {
        "format_version": FORMAT_VERSION, "format": fmt, "settings": settings, "name": splits.name,
        "class_names": list(splits.class_names), "source": spec,
        "taxonomy": splits.taxonomy.as_record() if splits.taxonomy is not None else None,
        "splits": {s: {"count": len(split), "digest": split.digest(), "parts": -(-len(split) // part_size)}
                   for s, split in present.items()},
    }


def _check_same_plan(root: Path, plan: dict) -> None:
    old = read_json(root / PLAN)
    differs = [key for key in ("format_version", "format", "settings", "class_names", "splits")
               if old.get(key) != plan[key]]
    if differs:
        detail = "; ".join(f"{key}: {old.get(key)!r} there, {plan[key]!r} now" for key in differs)[:600]
        raise ConfigError(f"{root} holds a prepared copy made with other settings or other data ({detail}); "
                          "use another --output, or delete it to start over")


@contextlib.contextmanager
def _exclusive(root: Path):
    with open(root / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another lpt prepare is writing {root}; wait for it to end") from None
        yield


def prepare(source: DataSource, output: str | os.PathLike, fmt: str = "litdata", short_side: int = 256,
            quality: int = 90, workers: int | None = None, part_size: int = 2048, spec: dict | None = None,
            progress: bool = True) -> dict:
    """Write the prepared copy of ``source`` to ``output`` (resuming one an earlier run left
    unfinished); returns the manifest."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    if short_side < 1 or not 1 <= quality <= 100 or part_size < 1:
        raise ConfigError(f"--short_side ({short_side}) and --part_size ({part_size}) must be >= 1 and --quality "
                          f"({quality}) in 1..100")
    workers = workers or len(os.sched_getaffinity(0))
    splits = source.load()
    present = {s: getattr(splits, s) for s in SPLITS if getattr(splits, s) is not None}
    if any(len(split) and not isinstance(split.items[0], str) for split in present.values()):
        raise ConfigError(f"{splits.name}: the source holds its images in memory (no image files): there is "
                          "nothing to decode or resize, train on the source directly")
    root = Path(output)
    root.mkdir(parents=True, exist_ok=True)
    settings = {"short_side": short_side, "quality": quality, "part_size": part_size}
    plan = _plan(splits, present, fmt, settings, spec or {"class_path": f"{type(source).__module__}.{type(source).__name__}"})
    with _exclusive(root):
        if (root / PLAN).is_file():
            _check_same_plan(root, plan)
            if (root / MANIFEST).is_file():
                return read_json(root / MANIFEST)
        else:
            for s, split, rel in zip(present, present.values(), relative_paths(present)):
                write_json_atomic(items_file(root, s), {
                    "origin": split.origin, "position_format": split.position_format, "paths": rel,
                    "labels": split.labels.tolist(),
                    "positions": None if split.positions is None else split.positions.tolist()})
            write_json_atomic(root / PLAN, plan)
        return _write_parts(root, plan, present, workers, progress)


def _write_parts(root: Path, plan: dict, present: dict, workers: int, progress: bool) -> dict:
    settings, fmt = plan["settings"], plan["format"]
    size = settings["part_size"]
    relative = {s: read_json(items_file(root, s))["paths"] for s in present}
    todo = [(s, p) for s, info in plan["splits"].items() for p in range(info["parts"])
            if not part_path(root, s, p).exists()]
    for s in present:
        part_path(root, s, 0).parent.mkdir(parents=True, exist_ok=True)
    tasks = ((present[s].items[i], settings["short_side"], settings["quality"])
             for s, p in todo for i in range(p * size, min((p + 1) * size, len(present[s]))))
    total = sum(min(size, len(present[s]) - p * size) for s, p in todo)
    counts = {"copied": 0, "resized": 0}
    bad: list[str] = []
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if workers > 1:
            pool = stack.enter_context(worker_processes().Pool(workers))
            results = pool.imap(_encode_task, tasks, chunksize=4)
        else:
            results = map(_encode_task, tasks)
        # images/s and ETA; in a batch job's log a line every 30 s instead of a redraw every 0.1 s
        bar = stack.enter_context(tqdm(total=total, unit="img", desc=f"lpt prepare -> {root}", disable=not progress,
                                       smoothing=0.05, mininterval=0.5 if sys.stderr.isatty() else 30))
        for s, p in todo:
            final = part_path(root, s, p)
            part = _LitDataPart(final) if fmt == "litdata" else _TreePart(final, root)
            part_bad = []
            for i in range(p * size, min((p + 1) * size, len(present[s]))):
                data, kind = next(results)
                if data is None:
                    part_bad.append(f"{present[s].items[i]} ({present[s].where(i)}): {kind}")
                elif not part_bad:
                    part.add(data, int(present[s].labels[i]), relative[s][i])
                    counts[kind] += 1
                bar.update(1)
            if part_bad:  # not committed: a rerun after the images are fixed writes this part
                part.abandon()
                bad += part_bad
            else:
                part.commit()
    if bad:
        shown = "\n  ".join(bad[:5]) + (f"\n  ... and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise DataFormatError(f"{len(bad)} of {total} images cannot be read:\n  {shown}\nfix or remove them and rerun the same "
                              "lpt prepare command (the finished parts are kept)")
    # this_run: what this (possibly resuming) run wrote; earlier runs' parts are not counted.
    manifest = {**plan, "this_run": {**counts, "seconds": round(time.perf_counter() - start, 1)},
                "image_bytes": sum(f.stat().st_size for f in (root / ("parts" if fmt == "litdata" else "images"))
                                   .rglob("*.bin" if fmt == "litdata" else "*") if f.is_file())}
    write_json_atomic(root / MANIFEST, manifest)
    return manifest


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="lpt prepare", allow_abbrev=False, description="Write a resized copy of a dataset "
                                     "(LitData shards or an image tree) for fast loading; read it with "
                                     "data.source: lpt_lightning.data.PreparedSource.")
    parser.add_argument("--config", required=True, help="the YAML of `lpt fit` or `lpt pipeline`: its data.source "
                        "(annotation lists, iNat json, image folder) is prepared, every split it has")
    parser.add_argument("--output", required=True, help="directory to write (rerun to resume an interrupted run)")
    parser.add_argument("--format", default="litdata", choices=FORMATS,
                        help="litdata: sharded (default); tree: resized images at the source's relative paths")
    parser.add_argument("--short_side", type=int, default=256, help="shorter image side after resizing (256)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of resized images (90)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all usable cores)")
    parser.add_argument("--part_size", type=int, default=2048, help="images per resumable part (2048)")
    ns = parser.parse_args(argv)
    source, spec = source_from_config(ns.config)
    manifest = prepare(source, ns.output, ns.format, ns.short_side, ns.quality, ns.workers, ns.part_size, spec)
    counts = ", ".join(f"{s} {info['count']:,}" for s, info in manifest["splits"].items())
    print(f"prepared {manifest['name']} ({counts}; {manifest['this_run']['resized']:,} resized and "
          f"{manifest['this_run']['copied']:,} copied as they were by this run) in {ns.output}: "
          f"{manifest['image_bytes'] / 1e6:.1f} MB of images\n"
          f"train on it with data.source: {{class_path: lpt_lightning.data.PreparedSource, "
          f"init_args: {{root: {ns.output}}}}}")
