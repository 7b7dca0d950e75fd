"""SplitAccuracy, EvalMetrics and shot groups against hand computations, ECE against torchmetrics,
and real 2-process gloo runs."""
import math
import os
import sys

import pytest
import torch

from lpt_lightning.errors import ConfigError
from lpt_lightning import metrics
from lpt_lightning.metrics import (
    EXTRA_KEYS,
    EvalMetrics,
    SplitAccuracy,
    format_metric_table,
    format_split_table,
    row_values,
    shot_groups,
)

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


# EvalMetrics case, classes 0-6 with training counts: many {0, 1}, medium {2, 3}, few {4, 5, 6}.
EVAL_COUNTS = [200, 150, 50, 30, 10, 5, 3]
EVAL_CASE = [  # (target, probabilities); class 3 is never predicted, class 6 never tested
    (0, [0.7, 0.1, 0.05, 0.05, 0.05, 0.05, 0.0]),  # right, confidence .7
    (0, [0.3, 0.6, 0.1, 0, 0, 0, 0]),              # -> 1, label ranked 2nd
    (1, [0.2, 0.8, 0, 0, 0, 0, 0]),                # right
    (2, [0.5, 0, 0.25, 0, 0.25, 0, 0]),            # -> 0; ties with class 4, which is after it: 2nd
    (3, [0, 0, 0.9, 0.1, 0, 0, 0]),                # -> 2
    (4, [0.4, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]),      # -> 0; 1 higher + 3 tied before it: 5th, in top-5
    (5, [0.4, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]),      # -> 0; 1 higher + 4 tied before it: 6th, not in top-5
    (5, [0, 0, 0, 0, 0, 1.0, 0]),                  # right, confidence 1 (last bin)
    (2, [0, 0, 1.0, 0, 0, 0, 0]),                  # right
]


def _eval_case():
    target = torch.tensor([t for t, _ in EVAL_CASE])
    probs = torch.tensor([p for _, p in EVAL_CASE])
    return probs, target


def test_eval_metrics_against_hand_computation():
    probs, target = _eval_case()
    m = EvalMetrics(EVAL_COUNTS)
    m.update(probs[:4], target[:4])
    m.update(probs[4:], target[4:])
    res = m.compute()
    # Per class (tested 0-5): recall .5, 1, .5, 0, 0, .5; predictions 4, 2, 2, 0, 0, 1;
    # F1 = 2TP / (predicted + tested) = 1/3, 2/3, 1/2, 0, 0, 2/3.
    f1 = [1 / 3, 2 / 3, 1 / 2, 0, 0, 2 / 3]
    p32 = lambda x: float(torch.tensor(x, dtype=torch.float32))  # the probabilities as stored
    nll = [-math.log(p32(x)) for x in (0.7, 0.3, 0.8, 0.25, 0.1, 0.1, 0.1)] + [0.0, 0.0]
    expected = {
        "acc": 4 / 9, "top5": 8 / 9, "top5_many": 1.0, "top5_medium": 1.0, "top5_few": 2 / 3,
        "balanced_acc": 2.5 / 6, "balanced_acc_many": 0.75, "balanced_acc_medium": 0.25, "balanced_acc_few": 0.25,
        "worst_class_acc": 0.0, "worst_class_acc_many": 0.5, "worst_class_acc_medium": 0.0, "worst_class_acc_few": 0.0,
        "hmean": 0.0, "hmean_many": 2 / 3, "hmean_medium": 0.0, "hmean_few": 0.0,
        "gmean": 0.0, "gmean_many": math.sqrt(0.5), "gmean_medium": 0.0, "gmean_few": 0.0,
        "macro_f1": sum(f1) / 6, "macro_f1_many": 0.5, "macro_f1_medium": 0.25, "macro_f1_few": 1 / 3,
        # ECE: no bin mixes right and wrong samples here, so it is mean |confidence - correct|.
        "ece": (0.3 + 0.6 + 0.2 + 0.5 + 0.9 + 0.4 + 0.4) / 9, "ece_many": (0.3 + 0.6 + 0.2) / 3,
        "ece_medium": (0.5 + 0.9) / 3, "ece_few": 0.8 / 3,
    }
    for k, v in expected.items():
        assert res[k].item() == pytest.approx(100 * v, rel=1e-5, abs=1e-4), k
    hand_nll = {"nll": sum(nll) / 9, "nll_many": sum(nll[:3]) / 3, "nll_medium": (nll[3] + nll[4] + nll[8]) / 3,
                "nll_few": (nll[5] + nll[6] + nll[7]) / 3}
    for k, v in hand_nll.items():
        assert res[k].item() == pytest.approx(v, rel=1e-6), k
    # Ties go to the lower class index: overall the first of the 0-recall classes 3, 4.
    assert [int(res[k]) for k in ("worst_class", "worst_class_many", "worst_class_medium", "worst_class_few")] == \
        [3, 0, 3, 4]
    confusion = torch.zeros(7, 7, dtype=torch.long)
    for (t, _), p in zip(EVAL_CASE, probs.argmax(1).tolist()):
        confusion[t, p] += 1
    assert confusion[0, 1] == confusion[3, 2] == confusion[5, 0] == 1 and confusion[3].sum() == 1
    assert torch.equal(res["confusion"], confusion)
    rel = res["reliability"]
    assert rel[0].tolist() == [0, 0, 0, 0, 0, 0, 2, 1, 0, 1, 1, 0, 1, 1, 2]
    assert rel[1, 6].item() == pytest.approx(40.0) and rel[2, 6].item() == 0.0 and rel[2, 14].item() == 100.0
    assert torch.isnan(rel[1:, :6]).all()
    assert row_values(res)["worst_class"] == 3


def test_eval_metrics_top_confused_pairs_beyond_the_matrix_limit(monkeypatch):
    monkeypatch.setattr(metrics, "CONFUSION_MATRIX_MAX_CLASSES", 3)
    probs, target = _eval_case()
    m = EvalMetrics(EVAL_COUNTS)
    m.update(torch.cat([probs, probs[6:7]]), torch.cat([target, target[6:7]]))  # 5 -> 0 twice
    res = m.compute()
    assert "confusion" not in res
    assert res["top_confused"].tolist() == [[5, 0, 2], [0, 1, 1], [2, 0, 1], [3, 2, 1], [4, 0, 1]]


def test_eval_metrics_empty_group_and_refused_inputs():
    m = EvalMetrics([200, 300, 50, 10])
    m.update(torch.tensor([[0.9, 0.1, 0, 0]]), torch.tensor([0]))
    res = row_values(m.compute())
    assert res["balanced_acc"] == pytest.approx(100.0) and res["worst_class"] == 0
    assert all(math.isnan(res[f"{k}_few"]) for k in ("top5", "balanced_acc", "hmean", "nll", "ece"))
    assert res["worst_class_few"] is None
    with pytest.raises(ConfigError, match="class probabilities"):
        m.update(torch.tensor([0, 1]), torch.tensor([0, 1]))


def test_ece_against_torchmetrics():
    from torchmetrics.functional.classification import multiclass_calibration_error

    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(3 * torch.randn(500, 10, generator=g), dim=1)
    target = torch.randint(0, 10, (500,), generator=g)
    m = EvalMetrics([300, 200, 150, 120, 90, 60, 40, 25, 12, 5])
    for i in range(0, 500, 64):
        m.update(probs[i:i + 64], target[i:i + 64])
    res = m.compute()
    reference = multiclass_calibration_error(probs, target, num_classes=10, n_bins=15, norm="l1")
    assert res["ece"].item() == pytest.approx(100 * reference.item(), rel=1e-5)
    few = torch.isin(target, torch.tensor([8, 9]))
    reference_few = multiclass_calibration_error(probs[few], target[few], num_classes=10, n_bins=15, norm="l1")
    assert res["ece_few"].item() == pytest.approx(100 * reference_few.item(), rel=1e-5)


def test_format_metric_table():
    probs, target = _eval_case()
    m = EvalMetrics(EVAL_COUNTS)
    m.update(probs, target)
    names = [f"c{i}" for i in range(7)]
    lines = format_metric_table({"expert": row_values(m.compute()), "old file": {"acc": 1.0}}, names).splitlines()
    assert lines[0].split() == ["top5", "balanced_acc", "worst_class_acc", "hmean", "gmean", "macro_f1", "nll", "ece"]
    assert lines[2].split()[:5] == ["expert", "88.89", "41.67", "0.00", "(c3)"]
    assert lines[3].split() == ["old", "file", *["-"] * 8]


@pytest.mark.ddp
def test_ddp_two_process_sync_of_every_metric(tmp_path):
    import torch.multiprocessing as mp

    sys.path.insert(0, os.path.dirname(__file__))
    import ddp_metric_worker

    g = torch.Generator().manual_seed(0)
    n = 37
    target = torch.randint(0, len(COUNTS) - 1, (n,), generator=g)  # class 6 untested
    probs = torch.softmax(3 * torch.randn(n, len(COUNTS), generator=g), dim=1)
    probs[:4] = 1 / len(COUNTS)  # ties
    single = EvalMetrics(COUNTS)
    single.update(probs, target)
    expected = single.compute()
    assert set(EXTRA_KEYS) <= set(expected)

    init = f"file://{tmp_path / 'rendezvous'}"
    from lpt_lightning.test_priors import PriorShiftAccuracy

    single_priors = PriorShiftAccuracy(COUNTS)
    single_priors.update(probs, target)
    expected_priors = single_priors.compute()["acc"]
    mp.spawn(ddp_metric_worker.run, args=(2, init, COUNTS, probs, target, str(tmp_path), "EvalMetrics",
                                          ("test_priors.PriorShiftAccuracy",)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(got) == set(expected)
        for k in expected:  # bit for bit: every state is an integer sum
            assert torch.equal(got[k].nan_to_num(-1), expected[k].nan_to_num(-1)), k
        # The test-prior accuracies (every prior and tau), from integer counts too.
        assert torch.equal(torch.load(tmp_path / f"rank{rank}_PriorShiftAccuracy.pt")["acc"], expected_priors)


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
