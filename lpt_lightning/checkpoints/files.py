"""Checkpoint files read and written: phase checkpoints and exports read through
`lpt_lightning.safe_load`, atomic writes, the safetensors export and the trainer's CheckpointIO."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from lpt_lightning.checkpoints.metadata import (
    META_KEY,
    is_saved_key,
    read_phase_metadata,
)
from lpt_lightning.safe_load import load_errors, read_safetensors, safe_load


def file_sha256(path: str | Path) -> str:
    """The hex sha256 of a file, read in 1 MB blocks (checkpoints are large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """Read a phase checkpoint (.ckpt) or an export (.safetensors) without running pickled code."""
    if Path(path).suffix != ".safetensors":
        return safe_load(path)
    state, metadata = read_safetensors(path)
    with load_errors(path):
        meta = json.loads(metadata.get(META_KEY, "null"))
    return {"state_dict": state, META_KEY: meta}


def atomic_save(save: Any, path: str | Path) -> None:
    """Write through ``save(tmp_path)`` then rename, so a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def export_safetensors(checkpoint_path: str | Path, out_path: str | Path) -> Path:
    """The trained tensors of a phase checkpoint plus its metadata, as one .safetensors file."""
    from safetensors.torch import save_file

    checkpoint = load_checkpoint_file(checkpoint_path)
    meta = read_phase_metadata(checkpoint, checkpoint_path)
    state = {k: v.contiguous() for k, v in checkpoint["state_dict"].items() if is_saved_key(k)}
    out_path = Path(out_path)
    atomic_save(lambda tmp: save_file(state, str(tmp), metadata={META_KEY: json.dumps(meta)}), out_path)
    return out_path


# Kept over Lightning's own atomic save (TorchCheckpointIO -> fsspec transaction): that one writes its temporary
# file in $TMPDIR and shutil.move()s it into place, a copy over the checkpoint when $TMPDIR is on another filesystem
# (/dev/shm, a node-local /tmp), so a save killed mid-copy tears last.ckpt; ours renames within the checkpoint's
# folder (tests/test_reliability.py shows both).
class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O that never leaves a half-written file (temporary file + rename)
    and reads checkpoints with ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote storage: the base class's fsspec path
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_save(lambda tmp: super(AtomicCheckpointIO, self).save_checkpoint(checkpoint, tmp, storage_options),
                    path)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        with load_errors(path):  # the base class: also remote (fsspec) paths
            return super().load_checkpoint(path, map_location=map_location or "cpu", weights_only=True)
