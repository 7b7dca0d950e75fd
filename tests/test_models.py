"""Experts: prompt insertion, adapters, prefix reuse, heads, weight loading."""
import pytest
import torch
import torch.nn.functional as F

from lpt_lightning.errors import CheckpointError, ConfigError
from lpt_lightning.losses import matching_loss
from lpt_lightning.models.backbones import BackboneSpec, build_backbone
from lpt_lightning.models.expert import ExpertSpec, GroupPromptSpec, LongTailExpert, class_name_to_text
from lpt_lightning.models.heads import CosineHead
from tiny_models import CLIP_TINY, TIMM_TINY, tiny_backbone

KINDS = ["visual", "vl"]
GROUP = GroupPromptSpec(pool_size=5, top_k=2, start_block=2, length=3)


def make_expert(kind, group=GROUP, **spec_kwargs):
    torch.manual_seed(0)
    spec_kwargs.setdefault("prompt_length", 3)
    spec = ExpertSpec(kind=kind, backbone=tiny_backbone(kind), **spec_kwargs)
    return LongTailExpert(spec, num_classes=6, group=group).eval()


def plain_backbone_feature(backbone, images):
    x = backbone.embed(images)
    for block in backbone.blocks:
        x = block(x)
    return backbone.pool(x)


@pytest.mark.parametrize("kind", KINDS)
def test_backbone_matches_library_forward(kind):
    expert = make_expert(kind, group=None)
    images = torch.rand(3, 3, 32, 32)
    bb = expert.backbone
    if kind == "visual":
        reference = bb.model.forward_head(bb.model.forward_features(bb.normalise(images)), pre_logits=True)
    else:
        reference = bb.visual(bb.normalise(images))
    torch.testing.assert_close(plain_backbone_feature(bb, images), reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_uint8_images_are_converted_on_the_device_as_to_tensor_did(kind):
    """The loaders deliver uint8; the backbone's x.float().div(255) gives the floats ToTensor gave,
    so logits are bit-identical to those of float input."""
    from torchvision.transforms import ToTensor

    expert = make_expert(kind)
    pixels = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    as_floats = torch.stack([ToTensor()(p.numpy()) for p in pixels])
    as_uint8 = pixels.permute(0, 3, 1, 2).contiguous()
    assert torch.equal(expert.backbone.normalise(as_uint8), expert.backbone.normalise(as_floats))
    assert torch.equal(expert(as_uint8).logits, expert(as_floats).logits)


@pytest.mark.parametrize("kind", KINDS)
def test_fresh_adapters_and_zero_prompts_equal_frozen_backbone(kind):
    expert = make_expert(kind, group=None, prompt_length=0)
    images = torch.rand(2, 3, 32, 32)
    # Equal to float rounding: the expert's last block computes only the CLS row (same math,
    # another kernel shape).
    torch.testing.assert_close(expert(images).features, plain_backbone_feature(expert.backbone, images),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_shared_prompt_is_appended_and_dropped_each_block(kind):
    expert = make_expert(kind, group=None)
    images = torch.rand(2, 3, 32, 32)
    bb = expert.backbone
    # Hand computation: append u_l after [cls; patches], run the block, drop the prompt outputs.
    x = bb.embed(images)
    n = x.shape[1]
    for i in range(bb.num_blocks):
        u = expert.shared_prompt.prompts[i].expand(2, -1, -1)
        x = bb.run_block(i, torch.cat([x, u], 1), expert.adapters[i])[:, :n]
    torch.testing.assert_close(expert(images).features, bb.pool(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_kept_token_attention_equals_the_full_block(kind):
    expert = make_expert(kind, group=None)
    bb = expert.backbone
    x = torch.cat([bb.embed(torch.rand(2, 3, 32, 32)), torch.randn(2, 5, bb.embed_dim)], 1)
    full = bb.run_block(1, x, expert.adapters[1])
    for keep in (x.shape[1] - 5, 1):
        torch.testing.assert_close(bb.run_block(1, x, expert.adapters[1], keep=keep), full[:, :keep],
                                   rtol=0, atol=2e-6)
    assert bb.pools_cls_token


@pytest.mark.parametrize("kind", KINDS)
def test_prefix_reuse_equals_two_pass(kind):
    expert = make_expert(kind)
    with torch.no_grad():
        for p in expert.adapters.parameters():
            p.normal_(0, 0.1)  # non-trivial adapters
    images = torch.rand(4, 3, 32, 32)
    out = expert(images)
    # Plain two-pass computation: a full query pass, then a full classification pass.
    query = expert(images, use_group_prompts=False).features
    match = expert.group_prompts.match(query)
    bb = expert.backbone
    x = bb.embed(images)
    x = expert.run_blocks(x, 0, expert.group_start)
    x = expert.run_blocks(x, expert.group_start, bb.num_blocks, match.prompts)
    torch.testing.assert_close(out.query, query, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.features, bb.pool(x), rtol=0, atol=1e-6)
    assert torch.equal(out.match.indices, match.indices)


def test_group_prompts_are_top2_average_after_block_k():
    expert = make_expert("visual")
    q = torch.randn(3, expert.backbone.feature_dim)
    m = expert.group_prompts.match(q)
    sims = F.normalize(q, dim=-1) @ F.normalize(expert.group_prompts.keys, dim=-1).t()
    top = sims.argsort(dim=-1, descending=True)[:, :2]
    assert torch.equal(m.indices.sort(dim=-1).values, top.sort(dim=-1).values)
    expected = (expert.group_prompts.prompts[top[:, 0]] + expert.group_prompts.prompts[top[:, 1]]) / 2
    torch.testing.assert_close(m.prompts, expected)
    assert m.prompts.shape == (3, 4 - GROUP.start_block, GROUP.length, expert.backbone.embed_dim)


def test_gradients_reach_only_the_intended_tensors():
    expert = make_expert("visual").train()
    for p in list(expert.shared_prompt.parameters()) + list(expert.adapters.parameters()):
        p.requires_grad_(False)
    images, labels = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    pool = expert.group_prompts

    out = expert(images)
    F.cross_entropy(20 * out.logits, labels).backward()
    assert pool.keys.grad is None or torch.count_nonzero(pool.keys.grad) == 0
    assert torch.count_nonzero(pool.prompts.grad) > 0
    assert all(p.grad is None for p in expert.backbone.parameters())

    expert.zero_grad(set_to_none=True)
    out = expert(images)
    matching_loss(out.query, pool.keys, out.match.indices).backward()
    assert torch.count_nonzero(pool.keys.grad) > 0
    assert pool.prompts.grad is None or torch.count_nonzero(pool.prompts.grad) == 0
    assert expert.head.weight.grad is None
    assert all(p.grad is None for p in expert.backbone.parameters())


def test_cosine_head_logits_are_cosines():
    head = CosineHead(4, 3, dropout=0.0)
    f = torch.randn(5, 4)
    expected = F.cosine_similarity(f[:, None, :], head.weight[None], dim=-1)
    torch.testing.assert_close(head(f), expected)
    assert (head(f).abs() <= 1 + 1e-6).all()


def test_vl_head_starts_from_text_embeddings_of_class_names():
    expert = make_expert("vl", group=None)
    names = ["sea_lion", "t-shirt", "cat", "dog", "ship", "car"]
    expert.init_head_from_text(names)
    bb = expert.backbone
    text = bb.encode_text(["a photo of a sea lion.", "a photo of a t shirt.", "a photo of a cat.",
                           "a photo of a dog.", "a photo of a ship.", "a photo of a car."])
    torch.testing.assert_close(expert.head.weight, F.normalize(text, dim=-1))
    assert class_name_to_text("sea_lion", "a photo of a {}.") == "a photo of a sea lion."



def test_text_head_refuses_placeholder_names_but_the_visual_expert_takes_them():
    from lpt_lightning.phases.adapt import AdaptPhase

    ids = ["0", "1", "2"]  # iNaturalist 2018's train2018.json without categories.json
    with pytest.raises(ConfigError, match=r"class names are numbers .*names_json=categories.json"):
        make_expert("vl", group=None).init_head_from_text(ids)
    with pytest.raises(ConfigError, match="names_json"):
        AdaptPhase(expert=ExpertSpec(kind="vl", backbone=tiny_backbone("vl"), prompt_length=2), num_classes=3,
                   class_names=ids)
    visual = AdaptPhase(expert=ExpertSpec(kind="visual", backbone=tiny_backbone("visual"), prompt_length=2),
                        num_classes=3, class_names=ids)
    assert visual.head_init == "random"
    # Real names that merely contain digits are names.
    make_expert("vl", group=None).init_head_from_text(["Mus musculus", "B-52", "7-spot ladybird", "a", "b", "c"])


def test_text_encoding_in_batches_equals_one_batch():
    bb = build_backbone("vl", tiny_backbone("vl"))
    prompts = [f"a photo of a species {i}." for i in range(23)]
    one = bb.encode_text(prompts, batch_size=len(prompts))
    for batch_size in (1, 5, 256):
        torch.testing.assert_close(bb.encode_text(prompts, batch_size=batch_size), one, rtol=0, atol=1e-6)


def test_text_head_is_encoded_once_per_tower_names_and_template(tmp_path, monkeypatch):
    monkeypatch.setenv("LPT_CACHE_DIR", str(tmp_path))
    names = ["sea_lion", "t-shirt", "cat", "dog", "ship", "car"]
    calls = []

    def counted(expert):
        encode = expert.backbone.encode_text
        monkeypatch.setattr(expert.backbone, "encode_text", lambda prompts: calls.append(prompts) or encode(prompts))
        return expert

    first = counted(make_expert("vl", group=None))  # make_expert seeds: the same random tower each time
    first.init_head_from_text(names)
    again = counted(make_expert("vl", group=None))  # built again (another rank, a later phase)
    again.init_head_from_text(names)
    assert len(calls) == 1 and len(list((tmp_path / "text_embeddings").glob("*.pt"))) == 1
    torch.testing.assert_close(again.head.weight, first.head.weight, rtol=0, atol=0)
    again.init_head_from_text(names[::-1])  # other names
    counted(make_expert("vl", group=None, text_template="itap of a {}.")).init_head_from_text(names)  # template
    other = counted(make_expert("vl", group=None))
    other.backbone._text_model[0].ln_final.weight.data.mul_(2)  # other weights
    other.init_head_from_text(names)
    assert len(calls) == 4
    for path in (tmp_path / "text_embeddings").glob("*.pt"):
        path.write_bytes(b"torn")  # an unreadable cache entry is encoded again, not an error
    counted(make_expert("vl", group=None)).init_head_from_text(names)
    assert len(calls) == 5

@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_backbone_loads_local_file(tmp_path, suffix):
    source = build_backbone("visual", tiny_backbone("visual"))
    path = tmp_path / f"vit{suffix}"
    state = {k: v.contiguous() for k, v in source.model.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    spec = BackboneSpec(name="vit_base_patch16_224", pretrained=False, checkpoint_path=str(path),
                        model_kwargs=dict(TIMM_TINY))
    loaded = build_backbone("visual", spec)
    images = torch.rand(2, 3, 32, 32)
    assert torch.equal(plain_backbone_feature(loaded, images), plain_backbone_feature(source, images))


def test_open_clip_backbone_loads_local_file(tmp_path):
    import open_clip
    torch.manual_seed(1)
    model = open_clip.CLIP(**CLIP_TINY)
    path = tmp_path / "clip.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    loaded = build_backbone("vl", BackboneSpec(checkpoint_path=str(path), model_kwargs=dict(CLIP_TINY)))
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(plain_backbone_feature(loaded, images), model.visual(loaded.normalise(images)))


def test_mismatched_weights_file_fails_clearly(tmp_path):
    other = dict(TIMM_TINY, embed_dim=48)
    source = build_backbone("visual", BackboneSpec(name="vit_base_patch16_224", pretrained=False, model_kwargs=other))
    path = tmp_path / "wrong.pth"
    torch.save(source.model.state_dict(), path)
    spec = BackboneSpec(name="vit_base_patch16_224", checkpoint_path=str(path), model_kwargs=dict(TIMM_TINY))
    with pytest.raises(CheckpointError, match=r"wrong\.pth.*shape mismatch"):
        build_backbone("visual", spec)
    with pytest.raises(CheckpointError, match="not found"):
        build_backbone("visual", BackboneSpec(checkpoint_path=str(tmp_path / "none.pth"), model_kwargs=dict(TIMM_TINY)))


def test_pickle_payload_in_weights_file_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("executed",))

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Payload()}, path)
    spec = BackboneSpec(checkpoint_path=str(path), model_kwargs=dict(TIMM_TINY))
    with pytest.raises(CheckpointError, match="evil.pth"):
        build_backbone("visual", spec)


def test_activation_checkpointing_gives_the_same_gradients():
    images, labels = torch.rand(3, 3, 32, 32), torch.tensor([0, 1, 2])
    grads = []
    for recompute in (False, True):
        expert = make_expert("visual", activation_checkpointing=recompute).train()
        torch.manual_seed(5)  # same adapter / head dropout masks in both runs
        out = expert(images)
        (F.cross_entropy(20 * out.logits, labels) - out.match.similarity.mean()).backward()
        grads.append({n: p.grad.clone() for n, p in expert.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 5
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


def test_half_precision_backbone_keeps_trained_tensors_fp32():
    expert = make_expert("visual", backbone_dtype="bfloat16").train()
    dtypes = {n: p.dtype for n, p in expert.backbone.named_parameters()}
    assert dtypes["model.blocks.0.attn.qkv.weight"] == torch.bfloat16 == dtypes["model.pos_embed"]
    assert dtypes["model.blocks.0.norm1.weight"] == torch.float32  # norms stay fp32
    trained = [expert.shared_prompt.prompts, expert.group_prompts.prompts, expert.head.weight]
    assert all(p.dtype == torch.float32 for p in trained + list(expert.adapters.parameters()))
    reference = make_expert("visual").eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = expert.eval()(images)
    torch.testing.assert_close(out.features.float(), reference(images).features, rtol=0.1, atol=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        F.cross_entropy(20 * expert.train()(images).logits.float(), torch.tensor([0, 1])).backward()
    assert expert.group_prompts.prompts.grad.dtype == torch.float32
    assert torch.count_nonzero(expert.group_prompts.prompts.grad) > 0
