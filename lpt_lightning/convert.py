"""Convert the released official LPT checkpoint (GitHub DongSky/LPT) into checkpoints of this project.

The official file is the state dict of its ``VPT_ViT`` (under ``state_dict``, keys possibly
prefixed ``module.``): the frozen timm ViT plus ``prompt_learner``:

=================================  ========================  ====================================
official key                       shape                     this project
=================================  ========================  ====================================
cls_token, pos_embed, patch_embed  timm ViT                  frozen backbone: not stored, compared
.*, blocks.*, norm.*                                         with ``--backbone-checkpoint`` if given
prompt_learner.Prompt_Tokens       [depth, L, d]             expert.shared_prompt.prompts
prompt_learner.Prompt_Tokens_pool  [m, depth - K, L, d]      expert.group_prompts.prompts
prompt_learner.Prompt_Keys         [m, d]                    expert.group_prompts.keys
prompt_learner.head.weight         [d, C] (class = column)   expert.head.weight [C, d] (transposed)
=================================  ========================  ====================================

The official forward is the one of ``LongTailExpert`` without adapters: block l sees
[cls; patches; shared_l] (+ the group prompt after block K), the query is the normed CLS feature
of the shared-prompt-only pass, the pool entries of the top-k (2, not stored in the file) cosine
similarities between query and keys are averaged, and the head is the cosine between the normed
feature and the normed class columns. Its ViT uses ``nn.LayerNorm`` (eps 1e-5) everywhere, which
the converted expert reproduces through ``backbone.layer_norm_eps``.

Two files are written: the phase-2 (``group_prompt``) checkpoint, and beside it the phase-1
(``adapt``) checkpoint it names as its ``phase1_checkpoint``, which ``GroupPromptPhase`` needs to
be built by ``lpt test``. The release holds no phase-1 head, so that file carries the final head.
"""
from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import lightning
import torch

from lpt_lightning import __version__
from lpt_lightning.checkpoints.files import atomic_save, file_sha256
from lpt_lightning.checkpoints.metadata import META_KEY, is_saved_key
from lpt_lightning.errors import CheckpointError, ConfigError
from lpt_lightning.models.backbones import REFERENCE_BACKBONES, BackboneSpec
from lpt_lightning.models.expert import ExpertSpec, GroupPromptSpec, LongTailExpert
from lpt_lightning.safe_load import read_state_dict

OFFICIAL_LAYER_NORM_EPS = 1e-5
SHARED, POOL, KEYS, HEAD = (f"prompt_learner.{n}" for n in ("Prompt_Tokens", "Prompt_Tokens_pool", "Prompt_Keys",
                                                             "head.weight"))
# The official training loss is not recorded in the file: the project's default scale, which sets
# the temperature of `lpt predict` probabilities and of phase 3's expert mixing.
LOGIT_SCALE = 20.0


def read_official_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The official state dict, read safely. The training script saves {'config', 'state_dict',
    'val_acc'} through DataParallel (every key prefixed ``module.``): `read_state_dict` takes the
    state dict out and drops the prefix."""
    return read_state_dict(path, "official LPT checkpoint")


def _ndim_checked(state: dict[str, torch.Tensor], key: str, ndim: int, path: Path) -> torch.Size:
    shape = state[key].shape
    if len(shape) != ndim:
        raise CheckpointError(f"{path}: {key} has shape {tuple(shape)}, expected {ndim} dimensions")
    return shape


def official_specs(state: dict[str, torch.Tensor], path: Path, backbone: BackboneSpec, top_k: int,
                   num_classes: int) -> tuple[ExpertSpec, GroupPromptSpec]:
    """Expert and group prompt specs read off the prompt tensors' shapes."""
    missing = [k for k in (SHARED, POOL, KEYS, HEAD) if k not in state]
    if missing:
        raise CheckpointError(f"{path}: lacks {missing[0]!r}; not an official LPT phase-2 checkpoint")
    depth, length, _ = _ndim_checked(state, SHARED, 3, path)
    pool_size, pool_depth, _, _ = _ndim_checked(state, POOL, 4, path)
    head_classes = _ndim_checked(state, HEAD, 2, path)[1]
    if head_classes != num_classes:
        raise ConfigError(f"{path}: {HEAD} has {head_classes} classes, but --num-classes is {num_classes}")
    if not 0 < pool_depth <= depth:
        raise CheckpointError(f"{path}: {POOL} covers {pool_depth} blocks, {SHARED} {depth}")
    expert = ExpertSpec(kind="visual", backbone=backbone, prompt_length=length, adapters=False, head_init="random")
    return expert, GroupPromptSpec(pool_size=pool_size, top_k=top_k, start_block=depth - pool_depth, length=length)


def check_official_keys(state: dict[str, torch.Tensor], path: Path, expert: LongTailExpert,
                        num_classes: int) -> None:
    """Every key known, none missing, every shape the one the official model has."""
    backbone = expert.backbone.model.state_dict()
    d, depth = expert.backbone.embed_dim, expert.backbone.num_blocks
    pool = expert.group_prompts
    expected = {k: v.shape for k, v in backbone.items()} | {
        SHARED: torch.Size([depth, expert.shared_prompt.length, d]),
        POOL: torch.Size([pool.prompts.shape[0], depth - expert.group_start, expert.shared_prompt.length, d]),
        KEYS: torch.Size([pool.prompts.shape[0], d]),
        HEAD: torch.Size([d, num_classes]),
    }
    unknown = [k for k in state if k not in expected]
    if unknown:
        raise CheckpointError(f"{path}: unknown key {unknown[0]!r} ({len(unknown)} in all); it is not a state "
                              f"dict of the official LPT model on backbone {expert.spec.backbone.name!r}")
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(f"{path}: lacks {missing[0]!r} ({len(missing)} in all) of the official LPT model "
                              f"on backbone {expert.spec.backbone.name!r}")
    for key, shape in expected.items():
        if state[key].shape != shape:
            raise CheckpointError(f"{path}: {key} has shape {tuple(state[key].shape)}, expected {tuple(shape)}")


def compare_backbone(state: dict[str, torch.Tensor], path: Path, expert: LongTailExpert, atol: float = 1e-6) -> None:
    """The official file carries the frozen backbone it was trained on: it must be the configured one."""
    for key, value in expert.backbone.model.state_dict().items():
        diff = (state[key].float() - value.float()).abs().max().item()
        if diff > atol:
            raise CheckpointError(f"{path}: backbone tensor {key!r} differs from {expert.spec.backbone.checkpoint_path} "
                                  f"by {diff:.3g}; the release was trained on other backbone weights")


def _checkpoint(state: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """What Lightning reads back from a phase checkpoint (no training state: nothing to resume)."""
    return {"pytorch-lightning_version": lightning.__version__, "state_dict": state, META_KEY: meta}


def convert_lpt_official(source: str | Path, output: str | Path, num_classes: int,
                         class_names: list[str] | None = None, backbone: BackboneSpec | None = None, top_k: int = 2,
                         layer_norm_eps: float = OFFICIAL_LAYER_NORM_EPS,
                         phase1_output: str | Path | None = None) -> tuple[Path, Path]:
    """Write the phase-2 checkpoint ``output`` and its phase-1 checkpoint; returns both paths.

    Args:
        source: the official ``.pth`` file.
        num_classes: classes of the dataset (checked against the head).
        class_names: recorded in the metadata (``lpt predict`` and reports show them).
        backbone: the frozen timm ViT the release was trained on (default: the reference ViT-B/16,
            ImageNet-21k). With a ``checkpoint_path`` its weights are compared with the backbone
            tensors in the release; without, the hub weights are loaded at use time, not now.
        top_k: group prompts averaged per image (the official value is not in the file).
        layer_norm_eps: LayerNorm epsilon of the official model.
        phase1_output: where the phase-1 checkpoint goes (default: beside ``output``, ``.phase1.ckpt``).
    """
    source, output = Path(source), Path(output)
    if class_names is not None and len(class_names) != num_classes:
        raise ConfigError(f"{len(class_names)} class names for --num-classes {num_classes}")
    phase1_output = Path(phase1_output) if phase1_output else output.with_suffix(".phase1.ckpt")
    state = read_official_state(source)
    backbone = backbone or BackboneSpec()
    spec = replace(backbone, name=backbone.name or REFERENCE_BACKBONES["timm"], layer_norm_eps=layer_norm_eps)
    expert_spec, group_spec = official_specs(state, source, spec, top_k, num_classes)
    # Without local weights, a random backbone of the same architecture gives names and shapes
    # (no download here); `lpt test` then builds the pretrained one from the recorded spec.
    build_spec = expert_spec if spec.checkpoint_path else replace(expert_spec, backbone=replace(spec, pretrained=False))
    expert = LongTailExpert(build_spec, num_classes, group=group_spec)
    check_official_keys(state, source, expert, num_classes)
    if spec.checkpoint_path:
        compare_backbone(state, source, expert)

    with torch.no_grad():
        expert.shared_prompt.prompts.copy_(state[SHARED])
        expert.group_prompts.prompts.copy_(state[POOL])
        expert.group_prompts.keys.copy_(state[KEYS])
        expert.head.weight.copy_(state[HEAD].t())  # official [d, C], ours [C, d]
    trained = {f"expert.{k}": v.clone() for k, v in expert.state_dict().items() if is_saved_key(k)}
    # Placeholder: the training counts are not in the release; `lpt test` takes them from the data.
    counts = {"class_counts": torch.ones(num_classes, dtype=torch.long)}
    common = {"version": __version__, "num_classes": num_classes, "class_names": class_names,
              "split_convention": "lpt", "logit_scale": LOGIT_SCALE, "expert": asdict(expert_spec),
              "converted_from": {"format": "lpt-official", "file": source.name, "sha256": file_sha256(source)}}
    phase1_state = {k: v for k, v in trained.items() if not k.startswith("expert.group_prompts.")}
    phase1 = _checkpoint(phase1_state | counts, common | {"phase": "adapt", "group_prompts": None})
    phase2 = _checkpoint(trained | counts, common | {"phase": "group_prompt", "group_prompts": asdict(group_spec),
                                                     "phase1_checkpoint": str(phase1_output)})
    atomic_save(lambda tmp: torch.save(phase1, tmp), phase1_output)
    atomic_save(lambda tmp: torch.save(phase2, tmp), output)
    return output, phase1_output
