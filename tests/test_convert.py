"""`lpt convert lpt-official`: a synthetic checkpoint in the official LPT layout (tiny random timm
ViT) is converted, loaded through the project's own code and checked against an independent
reference forward of the official model; malformed or unsafe files are refused."""
from __future__ import annotations

import csv
import logging
import math
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from lpt_lightning.checkpoints import expert_from_checkpoint, load_checkpoint_file
from lpt_lightning.cli import main
from lpt_lightning.convert import convert_lpt_official
from lpt_lightning.errors import CheckpointError
from lpt_lightning.models.backbones import BackboneSpec, build_backbone
from tiny_models import CLIP_TINY, TIMM_TINY

NAME = "vit_base_patch16_224"  # architecture only: TIMM_TINY shrinks it, weights are random
NUM_CLASSES, POOL_SIZE, SHARE_BLOCKS, LENGTH = 7, 5, 2, 3
OFFICIAL_EPS = 1e-5


def official_file(tmp_path: Path, mutate=None) -> tuple[Path, dict[str, torch.Tensor], Path]:
    """(official .pth, its state dict, the backbone weights as a local timm file).

    Laid out as the official training script saves it: {'config', 'state_dict', 'val_acc'}, keys
    prefixed 'module.' (DataParallel), backbone tensors beside ``prompt_learner.*``. Prompts are
    drawn far larger than at initialisation so that any misplaced token changes the logits.
    """
    torch.manual_seed(0)
    vit = timm.create_model(NAME, pretrained=False, num_classes=0, **TIMM_TINY)
    backbone = {k: v.clone() for k, v in vit.state_dict().items()}
    depth, d = TIMM_TINY["depth"], TIMM_TINY["embed_dim"]
    generator = torch.Generator().manual_seed(1)
    state = backbone | {
        "prompt_learner.Prompt_Tokens": torch.randn(depth, LENGTH, d, generator=generator),
        "prompt_learner.Prompt_Tokens_pool": torch.randn(POOL_SIZE, depth - SHARE_BLOCKS, LENGTH, d, generator=generator),
        "prompt_learner.Prompt_Keys": torch.randn(POOL_SIZE, d, generator=generator),
        "prompt_learner.head.weight": torch.randn(d, NUM_CLASSES, generator=generator),
    }
    if mutate is not None:
        mutate(state)
    path = tmp_path / "LPT_places.pth"
    torch.save({"config": {"prompt_length": LENGTH}, "state_dict": {f"module.{k}": v for k, v in state.items()},
                "val_acc": 50.0}, path)
    weights = tmp_path / "vit_tiny.pth"
    torch.save(backbone, weights)
    return path, state, weights


def tiny_spec(weights: Path) -> BackboneSpec:
    return BackboneSpec(name=NAME, checkpoint_path=str(weights), model_kwargs=dict(TIMM_TINY))


def convert(tmp_path: Path, mutate=None) -> tuple[Path, dict[str, torch.Tensor]]:
    source, state, weights = official_file(tmp_path, mutate)
    out, _ = convert_lpt_official(source, tmp_path / "converted.ckpt", NUM_CLASSES, backbone=tiny_spec(weights))
    return out, state


# ------------------------------------------------------------------ independent reference
def reference_forward(state: dict[str, torch.Tensor], images: torch.Tensor, eps: float = OFFICIAL_EPS):
    """The official LPT forward from the official tensors alone, in plain torch ops.

    Independent of the project: no timm module, no ``run_block``/``run_blocks``/expert code, no
    converted tensor. Patch embedding, attention, MLP and LayerNorms are computed here from the
    raw weights; prompts are appended after [cls; patches] as the official code does (shared
    prompt, then the averaged group prompt from block SHARE_BLOCKS on) and dropped after each block.
    Returns (cosine logits [B, C], top-2 pool indices [B, 2]).
    """
    w = state
    d, heads, patch = TIMM_TINY["embed_dim"], TIMM_TINY["num_heads"], TIMM_TINY["patch_size"]
    head_dim = d // heads

    def layer_norm(x, name):
        return F.layer_norm(x, (d,), w[f"{name}.weight"], w[f"{name}.bias"], eps)

    def linear(x, name):
        return x @ w[f"{name}.weight"].t() + w[f"{name}.bias"]

    def block(i, x):
        b, n, _ = x.shape
        qkv = linear(layer_norm(x, f"blocks.{i}.norm1"), f"blocks.{i}.attn.qkv")
        q, k, v = qkv.reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        attention = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
        x = x + linear((attention @ v).transpose(1, 2).reshape(b, n, d), f"blocks.{i}.attn.proj")
        hidden = F.gelu(linear(layer_norm(x, f"blocks.{i}.norm2"), f"blocks.{i}.mlp.fc1"))
        return x + linear(hidden, f"blocks.{i}.mlp.fc2")

    def cls_feature(tokens, group=None):
        x = tokens
        for i in range(TIMM_TINY["depth"]):
            prompts = [w["prompt_learner.Prompt_Tokens"][i].expand(x.shape[0], -1, -1)]
            if group is not None and i >= SHARE_BLOCKS:
                prompts.append(group[:, i - SHARE_BLOCKS])
            x = block(i, torch.cat([x, *prompts], dim=1))[:, :tokens.shape[1]]
        return layer_norm(x, "norm")[:, 0]

    x = (images - 0.5) / 0.5  # the official Normalize(mean=0.5, std=0.5)
    x = F.conv2d(x, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    tokens = torch.cat([w["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + w["pos_embed"]
    query = cls_feature(tokens)
    similarity = F.normalize(query, dim=1) @ F.normalize(w["prompt_learner.Prompt_Keys"], dim=1).t()
    top2 = similarity.topk(2, dim=1).indices
    group = w["prompt_learner.Prompt_Tokens_pool"][top2].mean(dim=1)
    feature = cls_feature(tokens, group)
    logits = F.normalize(feature, dim=1) @ F.normalize(w["prompt_learner.head.weight"], dim=0)
    return logits, top2


def images(n: int = 6) -> torch.Tensor:
    return torch.rand(n, 3, TIMM_TINY["img_size"], TIMM_TINY["img_size"], generator=torch.Generator().manual_seed(2))


# ------------------------------------------------------------------ conversion reproduces the official model
@torch.no_grad()
def test_converted_checkpoint_reproduces_the_official_forward(tmp_path):
    out, state = convert(tmp_path)
    expert = expert_from_checkpoint(load_checkpoint_file(out), out).eval()
    x = images()
    got = expert(x)
    want_logits, want_top2 = reference_forward(state, x)
    assert torch.equal(got.match.indices, want_top2)
    assert (got.logits - want_logits).abs().max().item() < 1e-5
    # The LayerNorm epsilon matters at this tolerance: timm's 1e-6 is measurably off.
    other_logits, _ = reference_forward(state, x, eps=1e-6)
    assert not torch.allclose(got.logits, other_logits, atol=0, rtol=0)


def test_converted_checkpoints_layout_and_metadata(tmp_path):
    out, state = convert(tmp_path)
    phase2, phase1 = load_checkpoint_file(out), load_checkpoint_file(tmp_path / "converted.phase1.ckpt")
    assert set(phase2["state_dict"]) == {"class_counts", "expert.shared_prompt.prompts", "expert.group_prompts.prompts",
                                         "expert.group_prompts.keys", "expert.head.weight"}
    assert torch.equal(phase2["state_dict"]["expert.head.weight"], state["prompt_learner.head.weight"].t())
    meta = phase2["lpt"]
    assert meta["phase"] == "group_prompt" and meta["num_classes"] == NUM_CLASSES
    assert meta["group_prompts"] == {"pool_size": POOL_SIZE, "top_k": 2, "start_block": SHARE_BLOCKS, "length": LENGTH}
    assert meta["expert"]["adapters"] is False and meta["expert"]["prompt_length"] == LENGTH
    assert meta["expert"]["backbone"]["layer_norm_eps"] == OFFICIAL_EPS
    assert meta["phase1_checkpoint"] == str(tmp_path / "converted.phase1.ckpt")
    assert phase1["lpt"]["phase"] == "adapt" and phase1["lpt"]["expert"] == meta["expert"]
    assert not [k for k in phase1["state_dict"] if "group_prompts" in k]


# ------------------------------------------------------------------ the LayerNorm-eps backbone option
def layer_norms(backbone):
    return [m for m in backbone.modules() if isinstance(m, torch.nn.LayerNorm)]


@torch.no_grad()
def test_layer_norm_eps_default_keeps_the_library_model():
    spec = BackboneSpec(name=NAME, pretrained=False, model_kwargs=dict(TIMM_TINY))
    ours = build_backbone("visual", spec)
    torch.manual_seed(0)
    library = timm.create_model(NAME, pretrained=False, num_classes=0, **TIMM_TINY).eval()
    assert [m.eps for m in layer_norms(ours)] == [m.eps for m in layer_norms(library)] == [1e-6] * (2 * 4 + 1)
    x = images(2)
    tokens = ours.embed(x)
    for i in range(ours.num_blocks):
        tokens = ours.run_block(i, tokens)
    assert torch.equal(ours.pool(tokens), library.forward_head(library.forward_features((x - 0.5) / 0.5),
                                                               pre_logits=True))


@pytest.mark.parametrize("kind", ["visual", "vl"])
def test_layer_norm_eps_is_applied_to_every_layer_norm(kind):
    if kind == "visual":
        spec = BackboneSpec(name=NAME, pretrained=False, model_kwargs=dict(TIMM_TINY), layer_norm_eps=1e-3)
    else:
        spec = BackboneSpec(pretrained=None, model_kwargs=dict(CLIP_TINY), layer_norm_eps=1e-3)
    norms = layer_norms(build_backbone(kind, spec))
    assert norms and all(m.eps == 1e-3 for m in norms)


# ------------------------------------------------------------------ refusals
def drop(key):
    return lambda state: state.pop(key)


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s.__setitem__("prompt_learner.extra", torch.zeros(1)), "unknown key 'prompt_learner.extra'"),
    (lambda s: s.__setitem__("head.weight", torch.zeros(NUM_CLASSES, 32)), "unknown key 'head.weight'"),
    (lambda s: s.__setitem__("prompt_learner.Prompt_Keys", torch.zeros(POOL_SIZE, 31)),
     "prompt_learner.Prompt_Keys has shape (5, 31), expected (5, 32)"),
    (lambda s: s.__setitem__("blocks.1.attn.qkv.weight", torch.zeros(96, 33)),
     "blocks.1.attn.qkv.weight has shape (96, 33), expected (96, 32)"),
    (lambda s: s.__setitem__("prompt_learner.Prompt_Tokens_pool", torch.zeros(POOL_SIZE, 2, LENGTH + 1, 32)),
     "prompt_learner.Prompt_Tokens_pool has shape (5, 2, 4, 32), expected (5, 2, 3, 32)"),
    (drop("blocks.3.mlp.fc2.bias"), "lacks 'blocks.3.mlp.fc2.bias'"),
    (drop("prompt_learner.Prompt_Keys"), "lacks 'prompt_learner.Prompt_Keys'"),
])
def test_malformed_official_files_are_refused_naming_file_and_key(tmp_path, mutate, message):
    with pytest.raises(CheckpointError) as exc:
        convert(tmp_path, mutate)
    assert str(tmp_path / "LPT_places.pth") in str(exc.value) and message in str(exc.value)
    assert not (tmp_path / "converted.ckpt").exists()


def test_other_backbone_weights_are_refused(tmp_path):
    source, _, weights = official_file(tmp_path)
    other = torch.load(weights, weights_only=True)
    other["blocks.0.norm1.weight"] += 0.1
    torch.save(other, weights)
    with pytest.raises(CheckpointError, match="backbone tensor 'blocks.0.norm1.weight' differs"):
        convert_lpt_official(source, tmp_path / "converted.ckpt", NUM_CLASSES, backbone=tiny_spec(weights))


class RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "code-ran"
    source = tmp_path / "LPT_places.pth"
    torch.save({"state_dict": {"cls_token": torch.zeros(1)}, "config": RunsCodeWhenUnpickled(marker)}, source)
    with pytest.raises(CheckpointError, match="cannot be loaded safely") as exc:
        convert_lpt_official(source, tmp_path / "converted.ckpt", NUM_CLASSES)
    assert str(source) in str(exc.value)
    assert not marker.exists()


# ------------------------------------------------------------------ command line, then `lpt test`
def write_image_folder(root: Path, per_class: int) -> None:
    generator = torch.Generator().manual_seed(3)
    for c in range(NUM_CLASSES):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = (torch.rand(32, 32, 3, generator=generator) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / f"class_{c}" / f"{i}.png")


def test_cli_convert_then_lpt_test(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lpt"])
    caplog.set_level(logging.INFO)
    source, _, weights = official_file(tmp_path)
    with pytest.raises(SystemExit):  # the CLI builds reference-named backbones only: check its parsing
        main(["convert", "lpt-official", "--help"])
    assert "--backbone-checkpoint" in capsys.readouterr().out
    # The tiny backbone needs model_kwargs, which only the Python API takes.
    convert_lpt_official(source, "converted.ckpt", NUM_CLASSES, backbone=tiny_spec(weights))
    write_image_folder(tmp_path / "images", per_class=4)
    main(["test", "--model=lpt_lightning.phases.GroupPromptPhase",
          "--model.init_args.phase1_checkpoint=converted.phase1.ckpt",
          f"--model.init_args.group_prompts={{pool_size: {POOL_SIZE}, top_k: 2, start_block: {SHARE_BLOCKS}, "
          f"length: {LENGTH}}}",
          "--data.source=lpt_lightning.data.ImageFolderSource", "--data.source.init_args.root=images",
          "--data.source.init_args.test_per_class=2", "--data.batch_size=4", "--data.num_workers=0",
          "--trainer.accelerator=cpu", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
          "--ckpt_path=converted.ckpt"])
    assert "Split accuracy (%, lpt convention)" in caplog.text
    # The per-class report counts the data's training images, not the checkpoint's placeholder.
    with open(tmp_path / "per_class_test.csv", newline="") as f:
        assert {row["train_count"] for row in csv.DictReader(f)} == {"2"}
