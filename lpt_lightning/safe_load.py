"""Reading tensor files without running pickled code: the one place that loads them.

``torch.load`` runs only with ``weights_only=True`` (tensors and plain data; any other pickled
object is refused, so a file cannot run code when read), safetensors through its own reader.
Every failure is a CheckpointError that names the file and says why in words that do not invite
an unsafe load (torch's own message suggests ``weights_only=False``).
"""
from __future__ import annotations

import contextlib
import pickle
from pathlib import Path
from typing import Any

import torch

from lpt_lightning.errors import CheckpointError


def safe_load(path: str | Path, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU. ``what`` names the file's role in the
    not-found message (e.g. ``"checkpoint"``, ``"weights file (backbone.checkpoint_path)"``)."""
    path = existing_file(path, what)
    with load_errors(path):
        return torch.load(path, map_location="cpu", weights_only=True)


WEIGHTS_FILE = "weights file (backbone.checkpoint_path)"


def read_state_dict(path: str | Path, what: str = WEIGHTS_FILE) -> dict[str, torch.Tensor]:
    """A model state dict from a .safetensors file or a torch file (the dict itself, or under
    ``state_dict``/``model``/``module``; a DataParallel ``module.`` key prefix removed)."""
    if Path(path).suffix == ".safetensors":
        return read_safetensors(path, what)[0]
    obj = safe_load(path, what)
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "module"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors; expected a model state dict file")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def read_safetensors(path: str | Path, what: str = "checkpoint") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the string metadata of a .safetensors file."""
    from safetensors import safe_open

    path = existing_file(path, what)
    with load_errors(path), safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def existing_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} not found")
    return path


@contextlib.contextmanager
def load_errors(path: str | Path, mismatch: str | None = None):
    """Turn any failure of the reading done inside into a CheckpointError naming ``path`` (our own
    CheckpointErrors and a missing file pass unchanged). ``mismatch``: for a loader that also fits
    the file into a model (a library's own), what to say when the file was read but does not fit."""
    try:
        yield
    except (CheckpointError, FileNotFoundError):
        raise
    except Exception as exc:  # unpickling refusal, truncation, another format; or a model mismatch
        reason = _unreadable(Path(path), exc)
        if reason is None and mismatch is not None:
            raise CheckpointError(f"{path}: {mismatch} ({_brief(exc)})") from exc
        if reason is None:
            first = str(exc).splitlines()[0] if str(exc) else ""
            reason = f"{type(exc).__name__}: {first}; the file is truncated, corrupt or not a checkpoint"
        raise CheckpointError(f"{path}: cannot be loaded safely: {reason}") from exc


def _unreadable(path: Path, exc: Exception) -> str | None:
    """Why ``exc`` means the file could not be read, or None when it is not one of those failures."""
    if path.is_file() and path.stat().st_size == 0:
        return "the file is empty"
    if "zip archive" in str(exc) or isinstance(exc, EOFError):
        return "the file is truncated or corrupt (not a complete checkpoint archive)"
    if isinstance(exc, pickle.UnpicklingError):
        return ("it is corrupt, or carries pickled objects other than tensors and plain data, which are refused "
                "because unpickling them can run code; re-save it with tensors and plain data only")
    return None


def _brief(exc: Exception, limit: int = 600) -> str:
    """``Type: message``, cut short: a strict load lists every one of hundreds of keys."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[:limit] + " ..."
