"""Text embeddings of the class prompts, computed once per tower, prompts and template.

Every rank builds the model, and under Lightning's DDP launcher rank 0 builds it once more
before starting the others: without a cache each would encode all class names (8,142 for
iNaturalist, minutes of CPU each). The first process encodes and saves them (atomically, under a
lock that makes the other processes on its node wait); the others read the file.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
from pathlib import Path

import torch

from lpt_lightning.errors import CheckpointError
from lpt_lightning.safe_load import safe_load

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """``$LPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/lpt_lightning``, else ``~/.cache/lpt_lightning``."""
    if os.environ.get("LPT_CACHE_DIR"):
        return Path(os.environ["LPT_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lpt_lightning"


@contextlib.contextmanager
def node_lock(folder: Path, name: str, what: str):
    """Hold ``folder/name`` locked across the processes of a node, so the first one does the work and
    the others wait and read its result. Yields False where the folder cannot hold a lock file: the
    caller goes on without the order (warned); a filesystem without locks only loses the order."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / name, "a")
    except OSError as exc:
        log.warning("%s: no lock file in %s (%s); set LPT_CACHE_DIR", what, folder, exc)
        yield False
        return
    with lock:
        with contextlib.suppress(OSError):
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield True


def cached_text_embeddings(backbone, prompts: list[str]) -> torch.Tensor:
    """``backbone.encode_text(prompts)``, read from the cache when this tower encoded these prompts
    before. An unusable cache folder only costs the encoding (with a warning), never the run."""
    key = hashlib.sha256("\n".join([backbone.text_digest(), *prompts]).encode()).hexdigest()[:32]
    folder = cache_dir() / "text_embeddings"
    path = folder / f"{key}.pt"
    with node_lock(folder, f"{key}.lock", "text-embedding cache") as usable:
        if not usable:
            return backbone.encode_text(prompts)
        cached = _read(path, len(prompts))
        if cached is not None:
            return cached
        embeddings = backbone.encode_text(prompts)
        from lpt_lightning.checkpoints.files import atomic_save  # here: lpt_lightning.checkpoints imports the models

        try:
            atomic_save(lambda tmp: torch.save(embeddings, tmp), path)
        except OSError as exc:
            log.warning("could not save text embeddings to %s (%s)", path, exc)
        return embeddings


def _read(path: Path, rows: int) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        embeddings = safe_load(path, "text-embedding cache")
    except CheckpointError as exc:  # a torn or foreign file is recomputed and replaced
        log.warning("ignoring unreadable text-embedding cache %s (%s)", path, exc)
        return None
    return embeddings if isinstance(embeddings, torch.Tensor) and embeddings.shape[0] == rows else None
