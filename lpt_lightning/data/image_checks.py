"""Checks that image files can be used, before training: per file, per split (in worker processes),
and over the DDP ranks with a record that lets later runs skip a passed check."""
from __future__ import annotations

import contextlib
import itertools
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image
from tqdm import tqdm

from lpt_lightning.checkpoints.files import atomic_save
from lpt_lightning.data.sources import Split
from lpt_lightning.errors import DataFormatError

# What PIL raises on missing, truncated or garbage files.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def worker_processes() -> multiprocessing.context.BaseContext:
    """The start method of the project's process pools: forkserver, not fork. A fork of a process
    that already runs threads (torch's, a loader's, tqdm's monitor) can copy a lock another thread
    holds, and the child then waits on it forever. The fork server is a fresh single-threaded
    process; it imports the worker functions' modules once, so workers do not each import torch."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["lpt_lightning.data.image_checks", "lpt_lightning.prepare"])
    return ctx


VerifyMode = Literal["header", "full", "off"]


# The last bytes of a complete file: JPEG's end-of-image marker, PNG's IEND chunk. Searched in the
# file's last _TAIL_BYTES, which leaves room for a little padding after the marker.
_END_MARKERS = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "PNG": b"IEND"}
_TAIL_BYTES = 64


def check_image(path: str, mode: VerifyMode = "header") -> str | None:
    """Why the image at ``path`` is unusable, or None. ``header`` parses the header (missing, empty,
    garbage or unknown-format files) and reads the last bytes of a JPEG or PNG: one without its end
    marker, cut off or with data appended, is decoded to tell the two apart. ``full`` decodes every
    pixel of every file (also finds damage inside the data, in any format)."""
    try:
        with Image.open(path) as img:
            if mode == "full" or not _ends_with_marker(path, img.format):
                img.load()
        return None
    except FileNotFoundError:
        return "does not exist"
    except DECODE_ERRORS as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _ends_with_marker(path: str, image_format: str | None) -> bool:
    marker = _END_MARKERS.get(image_format or "")
    if marker is None:
        return True  # no end marker to look for: only the full check finds such a file cut off
    with open(path, "rb") as f:
        f.seek(max(f.seek(0, os.SEEK_END) - _TAIL_BYTES, 0))
        return marker in f.read()


def _check_chunk(paths: list[str], mode: VerifyMode) -> list[str | None]:
    return [check_image(p, mode) for p in paths]


def verify_images(split: Split, mode: VerifyMode = "header", workers: int = 1, progress: bool = False,
                  sample: int | None = None, show: int = 5) -> int:
    """Check that every image file of ``split`` can be used, before training; DataFormatError
    naming each bad file and the line listing it.

    ``workers`` > 1 checks in that many processes; ``progress`` shows a bar (on a terminal).
    ``sample`` checks only that many evenly spaced items. Returns the number of files checked; in-
    memory array splits have none to check.
    """
    if mode == "off" or not split.items or not isinstance(split.items[0], str):
        return 0
    picks = np.arange(len(split.items))
    if sample is not None and sample < len(picks):
        picks = np.unique(np.linspace(0, len(picks) - 1, num=max(sample, 1)).round().astype(np.int64))
    paths = [split.items[i] for i in picks]
    chunk = 256  # large enough that inter-process traffic is negligible, small enough for a smooth bar
    chunks = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]
    bar = tqdm(total=len(paths), desc=f"checking images ({mode}) of {os.path.basename(split.origin)}",
               unit="img", disable=None if progress else True, leave=False)
    problems: list[str | None] = []
    with contextlib.ExitStack() as stack:
        if workers > 1 and len(chunks) > 1:
            pool = stack.enter_context(ProcessPoolExecutor(max_workers=workers, mp_context=worker_processes()))
            results = pool.map(_check_chunk, chunks, itertools.repeat(mode))
        else:
            results = (_check_chunk(c, mode) for c in chunks)
        for done in results:
            problems.extend(done)
            bar.update(len(done))
    bar.close()
    bad = [(int(i), why) for i, why in zip(picks, problems) if why is not None]
    if bad:
        shown = "\n  ".join(f"{split.items[i]} ({split.where(i)}): {why}" for i, why in bad[:show])
        more = f"\n  ... and {len(bad) - show} more" if len(bad) > show else ""
        raise DataFormatError(
            f"{len(bad)} of {len(paths)} checked images listed in {split.origin} cannot be read:\n  {shown}{more}\n"
            "fix the dataset root or the annotation file, or set data.skip_unreadable=true to train without them"
        )
    return len(paths)


def verify_split_on_ranks(split: Split, mode: VerifyMode, workers: int, skip_unreadable: bool,
                          record_dir: str | None) -> None:
    """`verify_images` over the ranks, each checking every world_size-th image, unless a record in
    ``record_dir`` says this split passed before (rank 0 reads it, so every rank takes the same
    path). Every rank raises when any rank found a bad image (with ``skip_unreadable``: warns)."""
    world, rank = _process_group()
    record = None if record_dir is None else Path(os.path.expanduser(record_dir)) / f"{split.digest()}-{mode}.json"
    found = record is not None and rank == 0 and _record_matches(record, split)
    if _gather(found)[0]:
        rank_zero_info(f"images of {split.origin} passed data.verify_images={mode} before ({record}); "
                       "not checked again")
        return
    shard = split if world == 1 else split.subset(np.arange(rank, len(split), world))
    try:
        verify_images(shard, mode, workers=workers, progress=rank == 0)
        problem = None
    except DataFormatError as exc:
        problem = str(exc)
    problems = [p for p in _gather(problem) if p is not None]
    if problems:
        if not skip_unreadable:
            raise DataFormatError("\n".join(problems))
        rank_zero_warn("\n".join(problems) + "\n(these images will be skipped: data.skip_unreadable=true)")
    elif record is not None and rank == 0:
        try:
            text = json.dumps({"origin": split.origin, "first_item": split.items[0], "images": len(split)})
            atomic_save(lambda tmp: tmp.write_text(text), record)
        except OSError as exc:
            rank_zero_warn(f"could not record the image check in {record} ({exc}); later runs check again")


def _process_group() -> tuple[int, int]:
    """(world size, rank) of the default process group; (1, 0) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _gather(value: Any) -> list[Any]:
    """``value`` of every rank, in rank order (``[value]`` without a process group)."""
    world, _ = _process_group()
    if world == 1:
        return [value]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, value)
    return out


def _record_matches(record: Path, split: Split) -> bool:
    """A record applies to the split at this location: the digest ignores where the dataset is
    mounted, and a copy elsewhere has files of its own to check."""
    try:
        return json.loads(record.read_text()).get("first_item") == split.items[0]
    except (OSError, ValueError, AttributeError):
        return False
