"""The expert forward as it was before the kept-token fix, for before/after figures.

Deep prompting drops the outputs at prompt positions after every block, and the pooled feature
reads only the CLS token. Until commit 50918b1 ("Kept-token attention") every block computed
queries, attention outputs, out-projection, MLP and adapter for all tokens, prompts included,
and the last block of each branch for all 197 tokens; for the open_clip expert the attention went
through ``nn.MultiheadAttention`` (with gradients: its general path). The library now computes
those only for the kept tokens (prompts serve as keys/values; the last block keeps CLS only),
with the same outputs. ``legacy_forward`` reproduces the old computation with the library's own
``FrozenViT.run_block(..., keep=None)`` (the full-block path) so the benchmark can time both side
by side; ``check_exactness`` confirms that logits and gradients agree.
"""
from __future__ import annotations

import torch

from lpt_lightning.models.prompts import append_tokens


def _legacy_run(expert, x: torch.Tensor, start: int, end: int, group_prompts=None) -> torch.Tensor:
    n = x.shape[1]
    bb = expert.backbone
    for i in range(start, end):
        shared = expert.shared_prompt(i) if expert.shared_prompt is not None else None
        group = group_prompts[:, i - expert.group_start] if group_prompts is not None else None
        adapter = expert.adapters[i] if expert.adapters is not None else None
        x = bb.run_block(i, append_tokens(x, shared, group), adapter)[:, :n]  # full block, then drop prompts
    return x


def legacy_forward(expert, images: torch.Tensor, use_group_prompts: bool = True):
    """``LongTailExpert.forward`` before the fix: every token through every block (prefix reuse kept)."""
    from lpt_lightning.models.expert import ExpertOutput

    bb = expert.backbone
    n = bb.num_blocks
    x = bb.embed(images)
    if expert.group_prompts is None or not use_group_prompts:
        features = bb.pool(_legacy_run(expert, x, 0, n))
        return ExpertOutput(logits=expert.head(features), features=features, query=features)
    x = _legacy_run(expert, x, 0, expert.group_start)
    with torch.set_grad_enabled(expert._query_needs_grad()):
        query = bb.pool(_legacy_run(expert, x, expert.group_start, n))
    match = expert.group_prompts.match(query.detach())
    features = bb.pool(_legacy_run(expert, x, expert.group_start, n, match.prompts))
    return ExpertOutput(logits=expert.head(features), features=features, query=query, match=match)


def check_exactness(seed: int = 0) -> dict[str, float]:
    """Largest |difference| of logits and of every trainable gradient between the library's forward
    and ``legacy_forward``, on small random-weight experts of both kinds (phase-1 and phase-2 settings)."""
    from lpt_lightning.models.backbones import BackboneSpec
    from lpt_lightning.models.expert import ExpertSpec, GroupPromptSpec, LongTailExpert

    timm_small = dict(img_size=64, patch_size=16, embed_dim=96, depth=4, num_heads=4)
    clip_small = dict(embed_dim=64, vision_cfg=dict(image_size=64, patch_size=16, width=96, layers=4, head_width=24),
                      text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=2))
    worst = {"logits": 0.0, "grad": 0.0}
    torch.manual_seed(seed)
    for kind, backbone in (("visual", BackboneSpec(name="vit_base_patch16_224", pretrained=False, model_kwargs=timm_small)),
                           ("vl", BackboneSpec(pretrained=None, model_kwargs=clip_small))):
        expert = LongTailExpert(ExpertSpec(kind=kind, backbone=backbone, prompt_length=5, head_init="random",
                                           adapter_dropout=0.0, head_dropout=0.0), 7,
                                group=GroupPromptSpec(pool_size=6, top_k=2, start_block=2, length=5))
        with torch.no_grad():
            for p in expert.adapters.parameters():
                p.normal_(0, 0.1)
        images = torch.rand(3, 3, 64, 64)
        for phase2 in (False, True):
            for name, p in expert.named_parameters():
                p.requires_grad_(not name.startswith("backbone.") and (
                    name.startswith(("group_prompts.", "head.")) if phase2 else not name.startswith("group_prompts.")))
            grads = []
            for forward in (type(expert).forward, legacy_forward):
                expert.zero_grad(set_to_none=True)
                out = forward(expert, images, use_group_prompts=phase2)
                (out.logits.square().sum() + out.query.sum()).backward()
                grads.append((out.logits.detach(), {n: p.grad.clone() for n, p in expert.named_parameters()
                                                    if p.grad is not None}))
            (la, ga), (lb, gb) = grads
            worst["logits"] = max(worst["logits"], float((la - lb).abs().max()))
            assert ga.keys() == gb.keys()
            worst["grad"] = max([worst["grad"]] + [float((ga[n] - gb[n]).abs().max()) for n in ga])
    return worst
