"""Unlabelled images for ``lpt predict``: a folder of images or a list file of image paths."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lpt_lightning.data.sources import IMAGE_EXTENSIONS, Split, read_lines
from lpt_lightning.errors import ConfigError


def image_paths_split(path: str) -> Split:
    """Unlabelled images (label -1) from a folder or a list file, for prediction."""
    root = Path(os.path.expanduser(path))
    if root.is_dir():
        items = sorted(str(f) for f in root.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if not items:
            raise ConfigError(f"data.predict_paths={path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in that folder")
    elif root.is_file():
        # One path per line (spaces allowed); a trailing integer label, as in a training list, is ignored.
        entries = [(n, line.strip()) for n, line in enumerate(read_lines(root), start=1) if line.strip()]
        paths = [_strip_label(line) for _, line in entries]
        items = [p if os.path.isabs(p) else str(root.parent / p) for p in paths]
        if not items:
            raise ConfigError(f"data.predict_paths={path}: the list file is empty")
        return Split(items=items, labels=np.full(len(items), -1, dtype=np.int64), origin=str(root),
                     positions=np.array([n for n, _ in entries]))
    else:
        raise ConfigError(f"data.predict_paths={path}: no such folder or list file")
    return Split(items=items, labels=np.full(len(items), -1, dtype=np.int64), origin=str(root))


def _strip_label(line: str) -> str:
    fields = line.rsplit(maxsplit=1)
    return fields[0] if len(fields) == 2 and fields[1].lstrip("-").isdigit() else line
