"""Wrapper fidelity at the real architectures (issue 22, item 1).

The shipped expert configs (``configs/expert/visual.yaml``: timm ``vit_base_patch16_224.augreg_in21k``;
``configs/expert/vl.yaml``: open_clip ``ViT-B-16`` / ``openai``) are built offline with random weights
saved to a local file. With prompts and adapters off, the expert's pooled feature must equal the
library's own forward of the same weights loaded through the library's hub loader, to 1e-5 in fp32:

- timm: ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": ...})``, then
  ``forward_head(forward_features(x), pre_logits=True)``;
- open_clip: ``open_clip.create_model(name, pretrained=<file>, force_quick_gelu=<the tag's value>)``,
  then ``encode_image``.

The wrappers call private library APIs (timm ``VisionTransformer._pos_embed``; open_clip
``VisionTransformer._embeds`` / ``_pool``), all in ``lpt_lightning/models/timm_backbone.py`` and
``open_clip_backbone.py``, and re-implement attention (with the last block's CLS-only queries):
these tests pin them, the whole expert and each backbone step on its own (``embed``, every
``run_block`` with all and with only the CLS query, ``pool``, ``encode_text``) against what the
library's own forward computes at that step. Tested with timm 1.0.31, open_clip_torch 3.3.0 and
torch 2.14.1 (CPU).
The OpenAI CLIP weights were trained with QuickGELU; open_clip builds ``ViT-B-16`` with GELU
unless told, so the open_clip tests fail on a wrapper that does not resolve the activation.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
import yaml

from lpt_lightning.errors import CheckpointError, ConfigError
from lpt_lightning.models.backbones import BackboneSpec, build_backbone
from lpt_lightning.models.expert import ExpertSpec, LongTailExpert

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = dict(atol=1e-5, rtol=1e-5)


def shipped_expert(name: str, weights: Path, **backbone) -> ExpertSpec:
    """The expert of configs/expert/<name>.yaml, weights from a local file, prompts and adapters off."""
    block = yaml.safe_load((REPO / "configs" / "expert" / f"{name}.yaml").read_text())
    spec = dict(block["backbone"], checkpoint_path=str(weights), **backbone)
    return ExpertSpec(kind=block["kind"], backbone=BackboneSpec(**spec), prompt_length=0, adapters=False)


def expert_feature(spec: ExpertSpec, images: torch.Tensor) -> torch.Tensor:
    expert = LongTailExpert(spec, num_classes=2).eval()
    with torch.no_grad():
        return expert(images).features


def images(size: int = 224) -> torch.Tensor:
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory) -> Path:
    """Random ViT-B-16 CLIP weights (image and text towers) as an open_clip checkpoint file."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None)
    path = tmp_path_factory.mktemp("clip") / "vit_b_16_random.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return path


def open_clip_reference(path: Path, x: torch.Tensor, quick_gelu: bool) -> torch.Tensor:
    import open_clip

    model = open_clip.create_model("ViT-B-16", pretrained=str(path), force_quick_gelu=quick_gelu).eval()
    cfg = open_clip.get_pretrained_cfg("ViT-B-16", "openai")  # the tag's own normalisation
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        return model.encode_image((x - mean) / std)


def test_openai_tag_builds_quick_gelu(clip_file):
    import open_clip
    from open_clip.transformer import QuickGELU

    assert open_clip.get_pretrained_cfg("ViT-B-16", "openai")["quick_gelu"] is True
    backbone = build_backbone("vl", shipped_expert("vl", clip_file).backbone)
    activations = {type(b.mlp.gelu) for b in backbone.visual.transformer.resblocks}
    text = {type(b.mlp.gelu) for b in backbone._text_model[0].transformer.resblocks}
    assert activations == text == {QuickGELU}


def test_vl_expert_matches_open_clip_encode_image(clip_file):
    x = images()
    ours = expert_feature(shipped_expert("vl", clip_file), x)
    reference = open_clip_reference(clip_file, x, quick_gelu=True)
    assert ours.shape == reference.shape == (1, 512)
    torch.testing.assert_close(ours, reference, **TOLERANCE)
    # The activation matters at this scale: GELU's features are not the published model's.
    assert not torch.allclose(ours, open_clip_reference(clip_file, x, quick_gelu=False), **TOLERANCE)


def test_local_file_without_tag_states_the_activation(clip_file):
    import open_clip

    with pytest.raises(ConfigError, match="backbone.quick_gelu"):
        build_backbone("vl", BackboneSpec(name="ViT-B-16", pretrained=None, checkpoint_path=str(clip_file)))
    stated = build_backbone("vl", BackboneSpec(name="ViT-B-16", pretrained=None, checkpoint_path=str(clip_file),
                                               quick_gelu=False))
    assert isinstance(stated.visual.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    # A stated value that contradicts the tag is refused, naming both options.
    with pytest.raises(ConfigError, match=r"backbone\.quick_gelu=False contradicts backbone\.pretrained='openai'"):
        build_backbone("vl", shipped_expert("vl", clip_file, quick_gelu=False).backbone)
    # A tag whose weights use GELU gives GELU.
    assert open_clip.get_pretrained_cfg("ViT-B-16", "laion2b_s34b_b88k").get("quick_gelu", False) is False
    laion = build_backbone("vl", BackboneSpec(name="ViT-B-16", pretrained="laion2b_s34b_b88k",
                                              checkpoint_path=str(clip_file)))
    assert isinstance(laion.visual.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)


def test_hub_path_passes_the_tags_activation(monkeypatch):
    """The hub path (no local file) asks open_clip for the tag's activation; nothing is downloaded."""
    import open_clip
    from open_clip.transformer import QuickGELU

    calls = []
    create = open_clip.create_model

    def offline_create(name, pretrained=None, **kwargs):
        calls.append((name, pretrained, kwargs))
        return create(name, pretrained=None, **kwargs)  # random weights instead of the download

    monkeypatch.setattr(open_clip, "create_model", offline_create)
    backbone = build_backbone("vl", BackboneSpec(name="ViT-B-16", pretrained="openai"))
    assert calls[-1][:2] == ("ViT-B-16", "openai") and calls[-1][2]["force_quick_gelu"] is True
    assert isinstance(backbone.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    build_backbone("vl", BackboneSpec(name="ViT-B-16", pretrained=True))  # True = openai
    assert calls[-1][1] == "openai" and calls[-1][2]["force_quick_gelu"] is True
    build_backbone("vl", BackboneSpec(name="ViT-B-16", pretrained="laion2b_s34b_b88k"))
    assert calls[-1][2]["force_quick_gelu"] is False
    with pytest.raises(ConfigError, match="backbone.pretrained='no_such_tag'"):
        build_backbone("vl", BackboneSpec(name="ViT-B-16", pretrained="no_such_tag"))


def test_wrong_open_clip_file_fails_clearly(tmp_path):
    path = tmp_path / "wrong.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match=r"wrong\.pt.*ViT-B-16"):
        build_backbone("vl", BackboneSpec(name="ViT-B-16", pretrained="openai", checkpoint_path=str(path)))


def test_visual_expert_matches_timm_forward(tmp_path):
    import timm

    name = "vit_base_patch16_224.augreg_in21k"
    torch.manual_seed(0)
    source = timm.create_model(name, pretrained=False)  # with its 21k-class head, as the hub file
    path = tmp_path / "augreg_in21k_random.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    spec = shipped_expert("visual", path)
    assert spec.backbone.name == name
    x = images()
    ours = expert_feature(spec, x)

    reference = timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": str(path)})
    reference.eval()
    cfg = reference.pretrained_cfg
    mean, std = torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = reference.forward_head(reference.forward_features((x - mean) / std), pre_logits=True)
    assert ours.shape == expected.shape == (1, 768)
    torch.testing.assert_close(ours, expected, **TOLERANCE)


# ------------------------------------------------------------------ each backbone step on its own


@contextlib.contextmanager
def recorded_blocks(blocks):
    """(input, output) of every block, in order, while the library's forward runs."""
    seen = []
    hooks = [block.register_forward_hook(lambda module, args, out: seen.append((args[0], out))) for block in blocks]
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


def check_steps(backbone, blocks, library_forward, x: torch.Tensor) -> None:
    """``embed``, each ``run_block`` (all queries, and the CLS query only) and ``pool`` against the
    tensors the library's own forward (``library_forward(normalised images) -> pooled feature``)
    computes at the same step, on the same weights."""
    with torch.no_grad(), recorded_blocks(blocks) as seen:
        expected = library_forward(backbone.normalise(x))
        assert len(seen) == backbone.num_blocks
        torch.testing.assert_close(backbone.embed(x), seen[0][0], **TOLERANCE)
        for i, (block_in, block_out) in enumerate(seen):
            torch.testing.assert_close(backbone.run_block(i, block_in), block_out, **TOLERANCE)
            torch.testing.assert_close(backbone.run_block(i, block_in, keep=1), block_out[:, :1], **TOLERANCE)
        last = seen[-1][1]
        torch.testing.assert_close(backbone.pool(last), expected, **TOLERANCE)
        # The pooled feature reads the CLS token only, as LongTailExpert.run_blocks relies on.
        assert backbone.pools_cls_token
        torch.testing.assert_close(backbone.pool(last[:, :1]), expected, **TOLERANCE)


def test_each_timm_backbone_step_matches_timm_forward():
    block = yaml.safe_load((REPO / "configs" / "expert" / "visual.yaml").read_text())["backbone"]
    backbone = build_backbone("visual", BackboneSpec(**dict(block, pretrained=False)))  # random weights
    model = backbone.model

    def library_forward(normalised):
        return model.forward_head(model.forward_features(normalised), pre_logits=True)

    check_steps(backbone, model.blocks, library_forward, images())


def test_each_open_clip_backbone_step_matches_open_clip_forward():
    import open_clip

    block = yaml.safe_load((REPO / "configs" / "expert" / "vl.yaml").read_text())["backbone"]
    backbone = build_backbone("vl", BackboneSpec(**dict(block, pretrained=None, quick_gelu=True)))  # random
    clip = backbone._text_model[0]  # the whole open_clip model: its image tower is backbone.visual
    assert clip.visual is backbone.visual
    check_steps(backbone, backbone.visual.transformer.resblocks, clip.encode_image, images())

    prompts = ["a photo of a cat.", "a photo of a dog.", "a photo of a t shirt."]
    with torch.no_grad():
        expected = clip.encode_text(open_clip.get_tokenizer("ViT-B-16")(prompts))
    ours = backbone.encode_text(prompts, batch_size=2)  # two batches
    assert ours.shape == (3, 512)
    torch.testing.assert_close(ours, expected, **TOLERANCE)
