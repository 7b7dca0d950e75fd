"""Losses against hand computations on small fixed inputs with fixed injected noise."""
import math

import pytest
import torch
import torch.nn.functional as F

from lpt_lightning.errors import ConfigError
from lpt_lightning.losses import (
    AGCL_GAMMAS_CLASS_BALANCED,
    AGCL_GAMMAS_INSTANCE,
    AGCLLoss,
    LogitAdjustedCE,
    gcl_class_offsets,
    gcl_logits,
    matching_loss,
    sample_gcl_noise,
)

COUNTS = [100, 10, 1]
Z = [[0.5, -0.2, 0.1], [0.3, 0.4, -0.6]]
Y = [2, 0]
EPS = [[0.3, -0.9, 0.6], [-0.2, 0.5, -1.0]]


def hand_gcl(z, y, counts, eps, beta, m, s):
    lmax, lmin = max(math.log(n) for n in counts), min(math.log(n) for n in counts)
    delta = [(lmax - math.log(n)) / (lmax - lmin) for n in counts]
    out = []
    for b, row in enumerate(z):
        r = []
        for c, v in enumerate(row):
            v = v - beta * abs(eps[b][c]) * delta[c]
            if c == y[b]:
                v -= m
            r.append(s * v)
        out.append(r)
    return out


def hand_agcl(z, y, counts, eps, beta, m, s, gp, gn, smoothing):
    x = hand_gcl(z, y, counts, eps, beta, m, s)
    C, total = len(counts), 0.0
    for b, row in enumerate(x):
        mx = max(row)
        den = sum(math.exp(v - mx) for v in row)
        p = [math.exp(v - mx) / den for v in row]
        for c in range(C):
            t = (1 - smoothing) * (c == y[b]) + smoothing / C
            w = (1 - p[c]) ** gp if c == y[b] else p[c] ** gn
            total -= t * w * math.log(p[c])
    return total / len(x)


def test_offsets_values():
    torch.testing.assert_close(gcl_class_offsets([100, 10, 1]), torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(gcl_class_offsets(torch.tensor([7, 7, 7])), torch.zeros(3))
    assert gcl_class_offsets([5]).tolist() == [0.0]


@pytest.mark.parametrize("bad", [[3, 0, 2], [3, -1, 2]])
def test_counts_rejected_naming_class(bad):
    with pytest.raises(ConfigError, match=r"\[1\]"):
        gcl_class_offsets(bad)
    with pytest.raises(ConfigError, match=r"\[1\]"):
        AGCLLoss(bad)
    with pytest.raises(ConfigError, match=r"\[1\]"):
        LogitAdjustedCE(bad)


def test_gcl_logits_hand():
    z, y, eps = torch.tensor(Z), torch.tensor(Y), torch.tensor(EPS)
    out = gcl_logits(z, y, gcl_class_offsets(COUNTS), eps, beta=0.5, margin=0.1, scale=20.0)
    expected = torch.tensor(hand_gcl(Z, Y, COUNTS, EPS, 0.5, 0.1, 20.0))
    torch.testing.assert_close(out, expected)
    # Spot-check one entry by hand: row 0, class 2 (target, delta=1): 20*(0.1 - 0.5*0.6 - 0.1).
    assert out[0, 2].item() == pytest.approx(20 * (0.1 - 0.3 - 0.1), abs=1e-5)
    # No noise: only the target margin and the scale.
    out0 = gcl_logits(z, y, gcl_class_offsets(COUNTS), None, beta=0.5, margin=0.1, scale=20.0)
    torch.testing.assert_close(out0, 20 * (z - 0.1 * F.one_hot(y, 3)))


@pytest.mark.parametrize("gammas", [AGCL_GAMMAS_CLASS_BALANCED, AGCL_GAMMAS_INSTANCE])
def test_agcl_matches_hand(gammas):
    gp, gn = gammas
    loss = AGCLLoss(COUNTS, scale=20.0, margin=0.1, beta=0.5, gamma_pos=gp, gamma_neg=gn, smoothing=0.1)
    out = loss(torch.tensor(Z), torch.tensor(Y), noise=torch.tensor(EPS))
    assert out.item() == pytest.approx(hand_agcl(Z, Y, COUNTS, EPS, 0.5, 0.1, 20.0, gp, gn, 0.1), rel=1e-5)


def test_agcl_reduces_to_cross_entropy():
    g = torch.Generator().manual_seed(0)
    z = torch.rand(6, 5, generator=g) * 2 - 1
    y = torch.randint(0, 5, (6,), generator=g)
    loss = AGCLLoss([50, 20, 9, 3, 1], scale=20.0, margin=0.0, beta=0.0, gamma_pos=0, gamma_neg=0, smoothing=0.0)
    torch.testing.assert_close(loss(z, y), F.cross_entropy(20 * z, y))


def test_agcl_weights_not_detached():
    gp, gn, s = 0.5, 8.0, 20.0
    z = torch.tensor(Z, dtype=torch.float64)
    y, eps = torch.tensor(Y), torch.tensor(EPS, dtype=torch.float64)
    loss = AGCLLoss(COUNTS, scale=s, gamma_pos=gp, gamma_neg=gn).double()

    zg = z.clone().requires_grad_(True)
    loss(zg, y, noise=eps).backward()

    # Finite differences agree with autograd: the weights are part of the graph.
    fd = torch.zeros_like(z)
    h = 1e-6
    for b in range(2):
        for c in range(3):
            zp, zm = z.clone(), z.clone()
            zp[b, c] += h
            zm[b, c] -= h
            fd[b, c] = (loss(zp, y, noise=eps) - loss(zm, y, noise=eps)) / (2 * h)
    torch.testing.assert_close(zg.grad, fd, rtol=1e-5, atol=1e-7)

    # A detached-weights version gives a different gradient.
    zd = z.clone().requires_grad_(True)
    x = gcl_logits(zd, y, gcl_class_offsets(COUNTS), eps, 0.5, 0.1, s)
    p = x.softmax(-1)
    onehot = F.one_hot(y, 3).double()
    w = torch.where(onehot.bool(), (1 - p) ** gp, p**gn).detach()
    t = 0.9 * onehot + 0.1 / 3
    (-(t * w * x.log_softmax(-1)).sum(-1).mean()).backward()
    assert not torch.allclose(zd.grad, zg.grad, rtol=1e-3, atol=1e-6)


def test_agcl_finite_gradient_when_target_saturates():
    # p_y rounds to 1 in float32: (1 - p_y) ** 0.5 naively has an infinite gradient.
    z = torch.tensor([[1.0, -1.0, -1.0]], requires_grad=True)
    loss = AGCLLoss([10, 5, 2], scale=64.0, margin=0.0, gamma_pos=0.5, gamma_neg=8.0)
    out = loss(z, torch.tensor([0]), noise=torch.zeros(1, 3))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(z.grad).all()


def test_agcl_noise_modes():
    z, y = torch.tensor(Z), torch.tensor(Y)
    loss = AGCLLoss(COUNTS)
    det = AGCLLoss(COUNTS, beta=0.0)(z, y)
    loss.eval()
    assert loss(z, y).item() == pytest.approx(det.item())  # eval: no noise, margin kept
    loss.train()
    torch.manual_seed(0)
    a = loss(z, y)
    b = loss(z, y)
    assert a.item() != b.item()  # fresh noise each call in training
    off = AGCLLoss(COUNTS, perturb=False)
    assert off(z, y, noise=torch.tensor(EPS)).item() == pytest.approx(det.item())


def test_agcl_buffers_follow_module():
    loss = AGCLLoss(COUNTS)
    assert {n for n, _ in loss.named_buffers()} == {"class_counts", "offsets"}
    assert loss.state_dict() == {}
    loss.to(torch.float64)
    assert loss.offsets.dtype == torch.float64


def test_agcl_shape_check():
    with pytest.raises(ConfigError):
        AGCLLoss(COUNTS)(torch.zeros(2, 4), torch.tensor([0, 1]))


def test_matching_loss_hand():
    q = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    k = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    idx = torch.tensor([[0, 2], [1, 2]])
    # cos(q0,k0)=1, cos(q0,k2)=1/sqrt2; cos(q1,k1)=0.8, cos(q1,k2)=7/(5 sqrt2)
    expected = -((1 + 1 / math.sqrt(2)) + (0.8 + 7 / (5 * math.sqrt(2)))) / 2
    qg, kg = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    out = matching_loss(qg, kg, idx)
    assert out.item() == pytest.approx(expected, rel=1e-6)
    out.backward()
    assert qg.grad.abs().sum() > 0 and kg.grad.abs().sum() > 0
    # Detached query: only the keys learn.
    kg.grad = None
    matching_loss(q, kg, idx).backward()
    assert kg.grad.abs().sum() > 0


def test_logit_adjusted_ce_hand():
    counts = [6, 3, 1]
    z, y = torch.tensor(Z), torch.tensor(Y)
    tau, s = 1.0, 20.0
    expected = 0.0
    for b in range(2):
        x = [s * Z[b][c] + tau * math.log(counts[c] / 10) for c in range(3)]
        lse = math.log(sum(math.exp(v) for v in x))
        expected += -(x[Y[b]] - lse)
    expected /= 2
    assert LogitAdjustedCE(counts, tau=tau, scale=s)(z, y).item() == pytest.approx(expected, rel=1e-5)


def test_noise_statistics():
    g = torch.Generator().manual_seed(123)
    eps = sample_gcl_noise((200_000,), generator=g)
    assert eps.min() >= -1 and eps.max() <= 1
    # Clamping at 3 std barely changes the std (truncated-normal std ~0.3287 vs 1/3).
    assert eps.std().item() == pytest.approx(1 / 3, abs=0.01)
    assert eps.mean().item() == pytest.approx(0.0, abs=0.005)
    # Reproducible with the same seed.
    g2 = torch.Generator().manual_seed(123)
    torch.testing.assert_close(sample_gcl_noise((200_000,), generator=g2), eps)
    # Clipped draws sit exactly at +-1: their share is P(|N(0, 1/3)| > 1) = 0.27% (31.7% if std were 1).
    assert (eps.abs() == 1).float().mean().item() == pytest.approx(0.0027, abs=0.001)
    # Unclipped part: std ~ 1/3 (the truncated normal at 3 std has std ~0.3287).
    inner = eps[eps.abs() < 1]
    assert inner.std().item() == pytest.approx(0.3287, abs=0.005)
