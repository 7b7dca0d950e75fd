"""MoE scorer: W_base search, zero-initialised offset, learned per-sample weights."""
import pytest
import torch

from lpt_lightning.models.scorer import BaseWeightSearch, MoEScorer, fuse


def search_base_weight(p_visual, p_vl, labels, step=0.05):
    """The live W_base search (`BaseWeightSearch`) over one set of held-out probabilities."""
    search = BaseWeightSearch(p_visual.shape[1], step)
    search.update(p_visual, p_vl, labels)
    return search.result()


def balanced_accuracy(predictions, labels, num_classes):
    """The balanced accuracy `BaseWeightSearch` scores a weight by: both experts predicting ``predictions``."""
    probs = torch.nn.functional.one_hot(predictions, num_classes).float()
    return search_base_weight(probs, probs, labels, step=1.0)[1][0.0]


def one_hot_probs(pred, num_classes, confidence):
    probs = torch.full((len(pred), num_classes), (1 - confidence) / (num_classes - 1))
    probs[torch.arange(len(pred)), pred] = confidence
    return probs


def test_balanced_accuracy_is_mean_per_class():
    labels = torch.tensor([0, 0, 0, 0, 1, 2])
    preds = torch.tensor([0, 0, 0, 1, 1, 0])
    assert balanced_accuracy(preds, labels, 4) == pytest.approx((3 / 4 + 1 + 0) / 3)


def test_fuse_scalar_and_per_sample():
    pv, pl = torch.tensor([[0.8, 0.2], [0.1, 0.9]]), torch.tensor([[0.2, 0.8], [0.5, 0.5]])
    torch.testing.assert_close(fuse(pv, pl, 0.25), 0.25 * pv + 0.75 * pl)
    w = torch.tensor([1.0, 0.0])
    torch.testing.assert_close(fuse(pv, pl, w), torch.stack([pv[0], pl[1]]))


def test_grid_search_finds_the_known_weight():
    # Sample of class 0: right iff 0.9w + 0.3(1-w) > 0.1w + 0.7(1-w), i.e. w > 1/3.
    # Sample of class 1: right iff 0.2w + 0.9(1-w) > 0.8w + 0.1(1-w), i.e. w < 4/7.
    # Both right for w in (1/3, 4/7): on the 0.05 grid the smallest best weight is 0.35.
    labels = torch.tensor([0, 1])
    pv = torch.tensor([[0.9, 0.1], [0.8, 0.2]])
    pl = torch.tensor([[0.3, 0.7], [0.1, 0.9]])
    w, scores = search_base_weight(pv, pl, labels, step=0.05)
    for grid_w, acc in scores.items():
        p = fuse(pv, pl, grid_w)
        both = bool(p[0, 0] > p[0, 1]) and bool(p[1, 1] > p[1, 0])
        assert (acc == 1.0) == both
    assert w == pytest.approx(0.35)
    assert scores[0.0] == 0.5 and scores[1.0] == 0.5
    assert len(scores) == 21


def test_zero_offset_reproduces_base_fusion_exactly():
    scorer = MoEScorer(8, 6, hidden_dim=16)
    scorer.w_base.fill_(0.35)
    qv, ql = torch.randn(5, 8), torch.randn(5, 6)
    w = scorer(qv, ql)
    assert torch.equal(w, torch.full((5,), 0.35))
    pv, pl = torch.softmax(torch.randn(5, 4), -1), torch.softmax(torch.randn(5, 4), -1)
    assert torch.equal(fuse(pv, pl, w), fuse(pv, pl, scorer.w_base))


def test_learned_scorer_beats_both_experts_when_they_are_complementary():
    torch.manual_seed(0)
    num_classes, n = 10, 2000
    labels = torch.randint(0, num_classes, (n,))
    visual_good = labels < 5  # visual expert is right on classes 0-4, the VL expert on 5-9
    wrong = (labels + 1) % num_classes
    pv = one_hot_probs(torch.where(visual_good, labels, wrong), num_classes, 0.7)
    pl = one_hot_probs(torch.where(visual_good, wrong, labels), num_classes, 0.7)
    # Query features carry the cue (which half of the classes the image looks like) plus noise.
    cue = visual_good.float()[:, None] * 2 - 1
    qv = torch.cat([cue, torch.randn(n, 7)], 1)
    ql = torch.randn(n, 6)
    accuracy = lambda p: float((p.argmax(1) == labels).float().mean())
    w_base, _ = search_base_weight(pv, pl, labels)
    scorer = MoEScorer(8, 6, hidden_dim=32)
    scorer.w_base.fill_(w_base)
    opt = torch.optim.AdamW(scorer.parameters(), lr=1e-2)
    for _ in range(200):
        w = scorer(qv, ql)
        p_label = w * pv[torch.arange(n), labels] + (1 - w) * pl[torch.arange(n), labels]
        loss = -torch.log(p_label).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        fused = accuracy(fuse(pv, pl, scorer(qv, ql)))
    assert accuracy(pv) == pytest.approx(0.5, abs=0.05) and accuracy(pl) == pytest.approx(0.5, abs=0.05)
    assert fused > 0.95 > max(accuracy(pv), accuracy(pl), accuracy(fuse(pv, pl, w_base)))
