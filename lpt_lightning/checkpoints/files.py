"""Checkpoint contents, safe loading and safetensors export.

Phase checkpoints hold only what was trained plus what is needed to rebuild the model: the
frozen backbones are rebuilt from their hub name or local file (recorded in the ``lpt``
metadata), so a checkpoint is a few MB instead of hundreds.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from lpt_lightning.errors import CheckpointError, ConfigError
from lpt_lightning.models.backbones import BackboneSpec
from lpt_lightning.models.expert import ExpertSpec, GroupPromptSpec, LongTailExpert

META_KEY = "lpt"


def is_saved_key(key: str) -> bool:
    """Everything but frozen backbones (and loss helpers, which are rebuilt from class counts)."""
    return "backbone." not in key and not key.startswith("stream_losses.")


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


def read_phase_metadata(checkpoint: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The ``lpt`` metadata, after checking the checkpoint has the shape every phase relies on."""
    meta = checkpoint.get(META_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(meta, dict) or "phase" not in meta:
        raise CheckpointError(f"{path}: not an lpt_lightning phase checkpoint (no '{META_KEY}' metadata)")
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: its state_dict is missing or holds something other than tensors")
    if not isinstance(meta.get("num_classes"), int) or meta["num_classes"] < 1:
        raise CheckpointError(f"{path}: metadata lacks a valid num_classes")
    if meta["phase"] in ("adapt", "group_prompt") and not isinstance(meta.get("expert"), dict):
        raise CheckpointError(f"{path}: metadata of a '{meta['phase']}' checkpoint lacks its expert spec")
    return meta


PHASE_NUMBERS = {"adapt": "phase 1", "group_prompt": "phase 2", "moe_scorer": "phase 3"}


def check_phase_metadata(meta: dict[str, Any], path: str | Path, option: str, phase: str | None = None,
                         num_classes: int | None = None) -> None:
    """Refuse a checkpoint of another phase than ``phase`` or for another class count (None: not
    checked). ``option`` is the setting that named the file, quoted in the message."""
    if phase is not None and meta["phase"] != phase:
        raise CheckpointError(f"{option}={path}: written by phase '{meta['phase']}', expected a checkpoint of "
                              f"phase '{phase}' ({PHASE_NUMBERS.get(phase, phase)})")
    if num_classes is not None and meta["num_classes"] != num_classes:
        raise ConfigError(f"{option}={path}: trained for {meta['num_classes']} classes, but the data has {num_classes}")


def check_same_data(recorded: dict[str, Any] | None, current: dict[str, Any] | None, what: str) -> None:
    """Refuse an upstream checkpoint trained on other data than this phase's: another training
    split, or another held-out split (whose images may then have been trained on)."""
    if current is None:
        return
    if not isinstance(recorded, dict) or "train" not in recorded:
        raise CheckpointError(
            f"{what}: the checkpoint records no training data, so nothing shows that this phase's held-out images "
            "were kept out of its training set; retrain it with this version of lpt_lightning")
    if recorded["train"] != current["train"]:
        raise CheckpointError(
            f"{what}: trained on another training split (digest {recorded['train']}, {recorded.get('num_train')} "
            f"images) than this phase's data (digest {current['train']}, {current.get('num_train')} images): "
            "use the same data section (source, long-tail settings, data.holdout_*) in every phase")
    if recorded.get("val") != current.get("val") or recorded.get("holdout") != current.get("holdout"):
        raise CheckpointError(
            f"{what}: trained with another held-out split ({recorded.get('holdout') or 'the dataset val split'}, "
            f"digest {recorded.get('val')}) than this phase's ({current.get('holdout') or 'the dataset val split'}, "
            f"digest {current.get('val')}): use the same data.holdout_* settings in every phase")


def expert_spec_from_dict(data: dict[str, Any], path: str | Path = "checkpoint") -> ExpertSpec:
    try:
        data = dict(data)
        data["backbone"] = BackboneSpec(**data["backbone"])
        return ExpertSpec(**data)
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: malformed expert spec in the metadata ({exc})") from None


def expert_from_checkpoint(checkpoint: dict[str, Any], path: str | Path, prefix: str = "expert.") -> LongTailExpert:
    """Rebuild a trained expert (frozen backbone from its spec, the rest from the checkpoint)."""
    meta = read_phase_metadata(checkpoint, path)
    if "expert" not in meta:
        raise CheckpointError(f"{path}: a '{meta['phase']}' checkpoint holds no single expert")
    try:
        group = GroupPromptSpec(**meta["group_prompts"]) if meta.get("group_prompts") else None
    except TypeError as exc:
        raise CheckpointError(f"{path}: malformed group prompt spec in the metadata ({exc})") from None
    expert = LongTailExpert(expert_spec_from_dict(meta["expert"], path), meta["num_classes"], group=group)
    release = getattr(expert.backbone, "release_text_tower", None)
    if release is not None:
        release()  # the head comes from the checkpoint
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    own = {k: v for k, v in expert.state_dict().items() if is_saved_key(k)}
    missing = sorted(set(own) - set(state))
    if missing:
        raise CheckpointError(f"{path}: lacks {len(missing)} trained tensors (e.g. {prefix}{missing[0]})")
    bad = [k for k in own if state[k].shape != own[k].shape]
    if bad:
        raise CheckpointError(f"{path}: {prefix}{bad[0]} has shape {tuple(state[bad[0]].shape)}, "
                              f"the model expects {tuple(own[bad[0]].shape)}")
    expert.load_state_dict({k: state[k] for k in own}, strict=False)
    return expert


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
