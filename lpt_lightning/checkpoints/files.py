"""Checkpoint files read and written: safe loading (``weights_only``, errors naming the file),
atomic writes, the safetensors export and the trainer's CheckpointIO built on them."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from lpt_lightning.checkpoints.metadata import (
    META_KEY,
    is_saved_key,
    read_phase_metadata,
)
from lpt_lightning.errors import CheckpointError


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """Read a phase checkpoint (.ckpt) or an export (.safetensors) without running pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get(META_KEY, "null"))
                state = {k: f.get_tensor(k) for k in f.keys()}
            return {"state_dict": state, META_KEY: meta}
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be loaded safely: {_load_failure(path, exc)}") from exc


def _load_failure(path: Path, exc: Exception) -> str:
    """Why a checkpoint did not load, in words that do not invite unpickling it unsafely (torch's
    own message suggests ``weights_only=False``, which would run any code the file carries)."""
    if path.is_file() and path.stat().st_size == 0:
        return "the file is empty"
    if "zip archive" in str(exc) or isinstance(exc, EOFError):
        return "the file is truncated or corrupt (not a complete checkpoint archive)"
    if isinstance(exc, pickle.UnpicklingError):
        return ("it is corrupt, or carries pickled objects other than tensors and plain data, which are refused "
                "because unpickling them can run code; re-save it with tensors and plain data only")
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first}; the file is truncated, corrupt or not a checkpoint"


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
        try:
            return super().load_checkpoint(path, map_location=map_location or "cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot be loaded safely: {_load_failure(Path(path), exc)}") from exc
