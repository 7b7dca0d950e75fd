"""Every attention the wrappers compute goes through F.scaled_dot_product_attention (flash /
memory-efficient kernels on GPUs) and equals the hand-written softmax(q k^T / sqrt(d)) v (timm's
unfused maths) to 1e-6 in float32: full blocks, prefix reuse and the kept-token last block."""
import pytest
import torch
import torch.nn.functional as F

from lpt_lightning.models.expert import ExpertSpec, GroupPromptSpec, LongTailExpert
from tiny_models import tiny_backbone


def hand_written_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
    assert attn_mask is None and dropout_p == 0.0 and not is_causal and scale is None
    return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v


@pytest.mark.parametrize("kind", ["visual", "vl"])
def test_sdpa_equals_hand_written_attention_on_every_path(kind, monkeypatch):
    torch.manual_seed(0)
    group = GroupPromptSpec(pool_size=4, top_k=2, start_block=2, length=2)
    expert = LongTailExpert(ExpertSpec(kind=kind, backbone=tiny_backbone(kind), prompt_length=3), 5, group=group)
    expert.eval()
    images = torch.rand(4, 3, 32, 32)
    fused = expert(images)
    fused_grads = torch.autograd.grad(fused.logits.square().sum(), [expert.shared_prompt.prompts,
                                                                     expert.group_prompts.prompts])
    calls = []

    def recorded(q, k, v, **kwargs):
        calls.append((q.shape[2], k.shape[2]))
        return hand_written_attention(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recorded)
    manual = expert(images)
    manual_grads = torch.autograd.grad(manual.logits.square().sum(), [expert.shared_prompt.prompts,
                                                                       expert.group_prompts.prompts])
    # 17 tokens ([cls; 16 patches]) query; keys add 3 shared (+2 group) prompt tokens. Blocks 0-1
    # once (the shared prefix), blocks 2-3 for the query pass and the prompted pass, whose last
    # block computes the CLS row only.
    assert calls == [(17, 20), (17, 20), (17, 20), (1, 20), (17, 22), (1, 22)]
    for name in ("logits", "features", "query"):
        torch.testing.assert_close(getattr(manual, name), getattr(fused, name), rtol=0, atol=1e-6)
    assert torch.equal(manual.match.indices, fused.match.indices)
    for a, b in zip(manual_grads, fused_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
