"""SplitAccuracy / shot groups against hand computations, and a real 2-process gloo run."""
import math
import os
import sys

import pytest
import torch

from lpt_lightning.errors import ConfigError
from lpt_lightning.metrics import SplitAccuracy, format_split_table, shot_groups

# class: 0    1    2   3   4   5  6
COUNTS = [500, 101, 100, 21, 20, 19, 5]


def test_shot_groups_conventions():
    lpt = shot_groups(COUNTS)
    assert lpt["many"].tolist() == [True, True, False, False, False, False, False]
    assert lpt["medium"].tolist() == [False, False, True, True, False, False, False]
    assert lpt["few"].tolist() == [False, False, False, False, True, True, True]
    oltr = shot_groups(COUNTS, "oltr")
    assert oltr["many"].tolist() == lpt["many"].tolist()
    assert oltr["medium"].tolist() == [False, False, True, True, True, False, False]
    assert oltr["few"].tolist() == [False, False, False, False, False, True, True]
    for g in (lpt, oltr):  # a partition
        assert (g["many"].int() + g["medium"].int() + g["few"].int()).eq(1).all()


def test_unknown_convention():
    with pytest.raises(ConfigError, match="lpt, oltr"):
        shot_groups(COUNTS, "lift")
    with pytest.raises(ConfigError):
        SplitAccuracy([3, -1])


def _case():
    # (target, predicted) pairs; class 6 has no test samples.
    pairs = [
        (0, 0), (0, 0), (0, 1),          # class 0: 2/3
        (1, 1), (1, 2),                  # class 1: 1/2
        (2, 2), (2, 2), (2, 2), (2, 0),  # class 2: 3/4
        (3, 4),                          # class 3: 0/1
        (4, 4), (4, 4),                  # class 4: 2/2
        (5, 5), (5, 0), (5, 1), (5, 1),  # class 5: 1/4
    ]
    target = torch.tensor([t for t, _ in pairs])
    labels = torch.tensor([p for _, p in pairs])
    return target, labels


def test_hand_computation_both_conventions():
    target, labels = _case()
    hand_pc = [200 / 3, 50.0, 75.0, 0.0, 100.0, 25.0, float("nan")]
    # LPT: many {0,1}: 3/5; medium {2 (exactly 100), 3}: 3/5; few {4 (exactly 20), 5, 6}: 3/6.
    exp_lpt = {"acc": 100 * 9 / 16, "acc_many": 100 * 3 / 5, "acc_medium": 100 * 3 / 5, "acc_few": 100 * 3 / 6}
    # OLTR: class 4 moves from few to medium: medium {2,3,4}: 5/7; few {5,6}: 1/4.
    exp_oltr = {"acc": 100 * 9 / 16, "acc_many": 100 * 3 / 5, "acc_medium": 100 * 5 / 7, "acc_few": 100 * 1 / 4}
    for conv, exp in (("lpt", exp_lpt), ("oltr", exp_oltr)):
        m = SplitAccuracy(COUNTS, convention=conv)
        m.update(labels[:7], target[:7])
        m.update(labels[7:], target[7:])
        res = m.compute()
        for k, v in exp.items():
            assert res[k].item() == pytest.approx(v, rel=1e-6), (conv, k)
        pc = res["per_class"]
        assert math.isnan(pc[6].item())
        torch.testing.assert_close(pc[:6], torch.tensor(hand_pc[:6]))
        assert m.convention == conv


def test_nan_for_empty_group_and_class():
    m = SplitAccuracy([200, 300, 50, 10])
    m.update(torch.tensor([0, 1]), torch.tensor([0, 0]))  # only class 0 tested
    res = m.compute()
    assert res["acc"].item() == pytest.approx(50.0)
    assert res["acc_many"].item() == pytest.approx(50.0)
    assert math.isnan(res["acc_medium"].item()) and math.isnan(res["acc_few"].item())
    assert res["per_class"][0].item() == pytest.approx(50.0)
    assert torch.isnan(res["per_class"][1:]).all()
    m.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(m.compute()["acc"].item())


def test_logits_and_labels_agree():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(40, len(COUNTS), generator=g)
    target = torch.randint(0, len(COUNTS), (40,), generator=g)
    a, b = SplitAccuracy(COUNTS), SplitAccuracy(COUNTS)
    a.update(scores, target)
    b.update(scores.argmax(1), target)
    ra, rb = a.compute(), b.compute()
    for k in ra:
        torch.testing.assert_close(ra[k], rb[k], equal_nan=True)


def test_bad_inputs():
    m = SplitAccuracy(COUNTS)
    with pytest.raises(ConfigError):
        m.update(torch.randn(3, 4), torch.tensor([0, 1, 2]))
    # Label ranges are checked on the device (no host sync per batch) and refused by compute().
    m.update(torch.tensor([0, 1]), torch.tensor([0, 7]))
    m.update(torch.tensor([0, 1]), torch.tensor([-1, 1]))
    with pytest.raises(ConfigError, match=r"2 target label\(s\) outside \[0, 6\]"):
        m.compute()
    with pytest.raises(ConfigError):
        m.update(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]))


def test_masks_are_buffers_not_states():
    m = SplitAccuracy(COUNTS, convention="oltr")
    assert set(m._defaults) == {"correct", "total", "invalid"}
    assert m.group_masks()["medium"].tolist() == shot_groups(COUNTS, "oltr")["medium"].tolist()
    m = m.to(torch.float64)  # masks stay boolean, states stay long
    assert m.mask_few.dtype == torch.bool and m.correct.dtype == torch.long


def test_format_split_table():
    target, labels = _case()
    m = SplitAccuracy(COUNTS)
    m.update(labels, target)
    table = format_split_table({"visual": m.compute(), "empty-few": {"acc": 50.0, "acc_many": 12.345,
                                                                    "acc_medium": 1.0, "acc_few": float("nan")}})
    lines = table.splitlines()
    assert lines[0].split() == ["overall", "many", "medium", "few"]
    assert lines[2].split() == ["visual", "56.25", "60.00", "60.00", "50.00"]
    assert lines[3].split() == ["empty-few", "50.00", "12.35", "1.00", "n/a"]
    assert len({len(l) for l in lines[:2]}) == 1


@pytest.mark.ddp
def test_ddp_two_process_sync(tmp_path):
    import torch.multiprocessing as mp

    sys.path.insert(0, os.path.dirname(__file__))
    import ddp_metric_worker

    g = torch.Generator().manual_seed(0)
    n = 37
    target = torch.randint(0, len(COUNTS), (n,), generator=g)
    preds = torch.where(torch.rand(n, generator=g) < 0.6, target, torch.randint(0, len(COUNTS), (n,), generator=g))
    single = SplitAccuracy(COUNTS)
    single.update(preds, target)
    expected = single.compute()

    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(ddp_metric_worker.run, args=(2, init, COUNTS, preds, target, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(got) == set(expected)
        for k in expected:
            torch.testing.assert_close(got[k], expected[k], equal_nan=True)
