"""Prototype of a faster, output-identical expert forward, measured side by side with the library's.

Deep prompting drops the outputs at prompt positions after every block, and the pooled feature
reads only the CLS token. So in every block the prompt tokens are needed only as attention keys
and values, and in the last block of each branch only the CLS row is needed. The library computes
queries, attention outputs, out-projection and MLP for every token in every block; this prototype:

1. projects queries, runs out-projection, MLP and adapter only for the kept tokens (K/V still come
   from all tokens, prompts included), and
2. keeps only the CLS token in the last block of each branch (query pass and classification pass).

Both are exact (same outputs up to float rounding; checked in the benchmark). The prototype
reimplements the attention step from the libraries' own weights and modules (timm ``Attention``:
``qkv``/``q_norm``/``k_norm``/``norm``/``proj``; open_clip: ``nn.MultiheadAttention``'s
``in_proj_weight``/``out_proj``) with one ``scaled_dot_product_attention`` call. (Calling open_clip's
``attention(q_x=..., k_x=..., v_x=...)`` with a query subset is exact too but takes
``nn.MultiheadAttention``'s slow general path and was 1.3x slower than the library's forward.) It lives here only to measure the gain; the fix belongs in ``lpt_lightning/models``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lpt_lightning.models.prompts import append_tokens


def _is_timm(backbone) -> bool:
    return hasattr(backbone, "model") and hasattr(backbone.model, "patch_embed")


def _attention_for_queries(backbone, block, h: torch.Tensor, n_q: int) -> torch.Tensor:
    """Attention-branch output for the first ``n_q`` tokens; keys/values from all tokens of ``h``
    (h = LN1 of [tokens; prompts])."""
    if _is_timm(backbone):
        attn = block.attn
        w, bias = attn.qkv.weight, attn.qkv.bias
        q_norm, k_norm, out = attn.q_norm, attn.k_norm, (lambda o: attn.proj(attn.norm(o)))
        post = lambda o: block.drop_path1(block.ls1(o))  # noqa: E731
    else:  # open_clip ResidualAttentionBlock around nn.MultiheadAttention (batch_first)
        attn = block.attn
        w, bias = attn.in_proj_weight, attn.in_proj_bias
        q_norm = k_norm = (lambda t: t)
        out = attn.out_proj
        post = block.ls_1
    b, n, c = h.shape
    heads = attn.num_heads
    dh = c // heads
    q = F.linear(h[:, :n_q], w[:c], bias[:c] if bias is not None else None)
    kv = F.linear(h, w[c:], bias[c:] if bias is not None else None)
    q = q.reshape(b, n_q, heads, dh).transpose(1, 2)
    k, v = kv.reshape(b, n, 2, heads, dh).permute(2, 0, 3, 1, 4).unbind(0)
    o = F.scaled_dot_product_attention(q_norm(q), k_norm(k), v)
    return post(out(o.transpose(1, 2).reshape(b, n_q, c)))


def _block(expert, i: int, x: torch.Tensor, group: torch.Tensor | None, keep: int) -> torch.Tensor:
    bb = expert.backbone
    block = bb.blocks[i]
    shared = expert.shared_prompt(i) if expert.shared_prompt is not None else None
    full = append_tokens(x, shared, group)
    h = (block.norm1 if _is_timm(bb) else block.ln_1)(full)
    x = x[:, :keep] + _attention_for_queries(bb, block, h, keep)
    adapter = expert.adapters[i] if expert.adapters is not None else None
    out = x + bb.mlp_branch(block, x)
    return out + adapter(x) if adapter is not None else out


def _run(expert, x: torch.Tensor, start: int, end: int, group_prompts=None, cls_only_last: bool = False):
    last = expert.backbone.num_blocks - 1
    for i in range(start, end):
        group = group_prompts[:, i - expert.group_start] if group_prompts is not None else None
        keep = 1 if (cls_only_last and i == last) else x.shape[1]
        x = _block(expert, i, x, group, keep)
    return x


def fast_forward(expert, images: torch.Tensor, use_group_prompts: bool = True):
    """Drop-in for ``LongTailExpert.forward`` (same outputs), with the two savings above."""
    from lpt_lightning.models.expert import ExpertOutput

    bb = expert.backbone
    n = bb.num_blocks
    x = bb.embed(images)
    if expert.group_prompts is None or not use_group_prompts:
        features = bb.pool(_run(expert, x, 0, n, cls_only_last=True))
        return ExpertOutput(logits=expert.head(features), features=features, query=features)
    x = _run(expert, x, 0, expert.group_start)
    with torch.set_grad_enabled(expert._query_needs_grad()):
        query = bb.pool(_run(expert, x, expert.group_start, n, cls_only_last=True))
    match = expert.group_prompts.match(query.detach())
    features = bb.pool(_run(expert, x, expert.group_start, n, match.prompts, cls_only_last=True))
    return ExpertOutput(logits=expert.head(features), features=features, query=query, match=match)


def check_exactness(seed: int = 0) -> dict[str, float]:
    """Largest |difference| of logits and of every trainable gradient between the library's forward
    and the prototype, on small random-weight experts of both kinds (phase-1 and phase-2 settings)."""
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
            for forward in (type(expert).forward, fast_forward):
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
