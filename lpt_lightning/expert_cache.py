"""Cached expert outputs for phase 3.

Frozen experts in eval mode are deterministic functions of the image, so their probabilities
and query features are computed once per (checkpoints, split) and stored; the MoE scorer then
trains on these tensors, and phase 3 costs about one inference pass plus seconds.

Each rank computes its own shard (unpadded), the shards are merged by rank 0 into one file,
written atomically, and every rank reads the merged file.
"""
from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from lpt_lightning.checkpoints import atomic_save
from lpt_lightning.data.sources import Split
from lpt_lightning.errors import CheckpointError, ConfigError
from lpt_lightning.models.expert import LongTailExpert

CACHE_FORMAT = 1


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_key(checkpoint_digests: list[str], split: Split, img_size: int, full_probs: bool) -> str:
    """Changes whenever an expert checkpoint, the split's images/labels or the view of them changes."""
    h = hashlib.sha256(f"v{CACHE_FORMAT}|{img_size}|{full_probs}|".encode())
    for digest in checkpoint_digests:
        h.update(digest.encode())
    h.update("\n".join(map(str, split.items)).encode())
    h.update(split.labels.tobytes())
    return h.hexdigest()[:20]


@torch.no_grad()
def compute_outputs(experts: dict[str, LongTailExpert], scales: dict[str, float], loader: DataLoader,
                    device: torch.device, full_probs: bool, autocast: Callable | None = None) -> dict[str, torch.Tensor]:
    """Per sample: index, label, and per expert its query feature and either the full probability
    vector softmax(s * logits) or only the probability of the true label."""
    parts: dict[str, list[torch.Tensor]] = {}
    for expert in experts.values():
        expert.eval()  # no adapter / head dropout: outputs must be deterministic to be cached
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device)
        row = {"index": batch["index"].to(device), "label": labels}
        for name, expert in experts.items():
            with autocast() if autocast is not None else torch.autocast(device.type, enabled=False):
                out = expert(images)
            probs = torch.softmax(scales[name] * out.logits.float(), dim=-1)
            row[f"{name}.query"] = out.query.float()
            if full_probs:
                row[f"{name}.prob"] = probs
            else:
                row[f"{name}.prob_label"] = probs.gather(1, labels.clamp_min(0)[:, None]).squeeze(1)
        for k, v in row.items():
            parts.setdefault(k, []).append(v.cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def ensure_disk_space(directory: Path, needed_bytes: int) -> None:
    """Refuse to start an inference pass whose result cannot be stored (checked up front)."""
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < 1.1 * needed_bytes:
        raise ConfigError(f"expert-output cache needs about {needed_bytes / 1e9:.2f} GB in {directory}, "
                          f"only {free / 1e9:.2f} GB are free; set model.init_args.cache_dir to a larger disk")


def merge_shards(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate rank shards and order rows by sample index."""
    shards = [s for s in shards if s]
    merged = {k: torch.cat([s[k] for s in shards]) for k in shards[0]}
    order = merged["index"].argsort()
    return {k: v[order] for k, v in merged.items()}


def load_cache(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: unreadable expert-output cache ({exc}); delete it to recompute") from exc
    if not isinstance(data, dict) or "index" not in data:
        raise CheckpointError(f"{path}: not an expert-output cache; delete it to recompute")
    return data


def cached_outputs(path: Path, compute: Callable[[], dict[str, torch.Tensor]], rank: int, world_size: int,
                   barrier: Callable[[], None]) -> dict[str, torch.Tensor]:
    """Load ``path`` or compute it (sharded across ranks, merged by rank 0, written atomically)."""
    if path.is_file():
        return load_cache(path)
    shard = compute()
    if world_size == 1:
        merged = merge_shards([shard])
        atomic_save(lambda tmp: torch.save(merged, tmp), path)
        return merged
    shard_path = path.with_name(f"{path.name}.rank{rank}")
    atomic_save(lambda tmp: torch.save(shard, tmp), shard_path)
    barrier()
    if rank == 0:
        shards = [load_cache(path.with_name(f"{path.name}.rank{r}")) for r in range(world_size)]
        atomic_save(lambda tmp: torch.save(merge_shards(shards), tmp), path)
        for r in range(world_size):
            path.with_name(f"{path.name}.rank{r}").unlink(missing_ok=True)
    barrier()
    return load_cache(path)
