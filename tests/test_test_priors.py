"""Accuracy under other test class distributions with post-hoc logit adjustment (lpt_lightning.test_priors)."""
import copy
import json
import math
import sys
from dataclasses import asdict

import pytest
import torch
import yaml

from lpt_lightning.errors import ConfigError
from lpt_lightning.lightning_cli import LPTCLI
from lpt_lightning.pipeline import run_pipeline
from lpt_lightning.reports import write_metrics
from lpt_lightning.test_priors import (
    TAU_GRID,
    PriorShiftAccuracy,
    imbalance_factors,
    plot_test_priors,
    prior_block,
    prior_names,
    select_tau,
    target_priors,
)
from datasets_available import needs_fmnist
from tiny_models import tiny_backbone, tiny_image_folder

R = math.sqrt(10)  # 10 ** (1 / 2): the middle class of three under rho = 10


def test_priors_by_training_rank_against_hand_computed_values():
    # Ranked by count: class 1 (50) first, then class 2 (20), then class 0 (5).
    priors = target_priors([5, 50, 20], [10])
    assert list(priors) == ["backward_10", "uniform", "forward_10"]
    z = 1 + 1 / R + 1 / 10
    torch.testing.assert_close(priors["forward_10"], torch.tensor([0.1, 1, 1 / R], dtype=torch.float64) / z)
    torch.testing.assert_close(priors["backward_10"], torch.tensor([1, 0.1, 1 / R], dtype=torch.float64) / z)
    torch.testing.assert_close(priors["uniform"], torch.full((3,), 1 / 3, dtype=torch.float64))
    # Ties ranked by class index: classes 0 and 1 (10 each) take ranks 0 and 1; exponents i / (C - 1) = i / 3.
    tied = target_priors([10, 10, 3, 7], [8])["forward_8"]
    expected = torch.tensor([1, 8 ** (-1 / 3), 8 ** (-1), 8 ** (-2 / 3)], dtype=torch.float64)
    torch.testing.assert_close(tied, expected / expected.sum())
    assert prior_names([50, 2, 10]) == ["backward_50", "backward_10", "backward_2", "uniform", "forward_2",
                                        "forward_10", "forward_50"]


def test_option_values():
    assert imbalance_factors(True) == (2, 5, 10, 25, 50)
    assert imbalance_factors(None) is None and imbalance_factors(False) is None
    assert imbalance_factors([10, 2, 10]) == (2.0, 10.0)
    with pytest.raises(ConfigError, match=r"report.test_priors=\[1\].*factors > 1"):
        imbalance_factors([1])


def test_weighted_accuracy_from_a_hand_written_confusion():
    # Counts rank the classes 0, 1, 2. Class 0: 3 of 4 right, class 1: 1 of 2, class 2: 0 of 4.
    target = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    predicted = torch.tensor([0, 0, 0, 1, 1, 0, 0, 0, 1, 1])
    probs = 0.1 + 0.7 * torch.nn.functional.one_hot(predicted, 3).float()
    metric = PriorShiftAccuracy([100, 10, 1], [10])
    metric.update(probs[:6], target[:6])
    metric.update(probs[6:], target[6:])
    acc = metric.compute()["acc"]
    assert acc.shape == (3, len(TAU_GRID))
    z = 1 + 1 / R + 0.1
    recall = (0.75, 0.5, 0.0)
    forward = 100 * (recall[0] * 1 + recall[1] / R) / z
    backward = 100 * (recall[0] * 0.1 + recall[1] / R) / z
    torch.testing.assert_close(acc[:, 0], torch.tensor([backward, 100 * 1.25 / 3, forward], dtype=torch.float64))
    # A class absent from the test set leaves the prior renormalised over the tested ones.
    metric = PriorShiftAccuracy([100, 10, 1], [10])
    metric.update(probs[:6], target[:6])
    torch.testing.assert_close(metric.compute()["acc"][2, 0],
                               torch.tensor(100 * (0.75 + 0.5 / R) / (1 + 1 / R), dtype=torch.float64))


def test_tau_selection_and_the_reported_block():
    nan = float("nan")
    val = torch.tensor([[1.0, 3.0, 3.0, 2.0], [nan, nan, nan, nan], [5.0, 2.0, 1.0, 5.0]])
    assert select_tau(val).tolist() == [1, 0, 0]  # first best (smaller tau); undefined: none
    test = torch.tensor([[10.0, 20.0, 30.0, 40.0], [11.0, 12.0, 13.0, 14.0], [50.0, 60.0, 70.0, 80.0]])
    taus = [0.0, 0.5, 1.0, 1.5]
    names = ["backward_10", "uniform", "forward_10"]
    block = prior_block(names, taus, test, val, "val")
    assert block == {"tau_chosen_on": "val", "priors": {
        "backward_10": {"acc": 10.0, "acc_la": 20.0, "tau": 0.5},
        "uniform": {"acc": 11.0, "acc_la": 11.0, "tau": 0.0},
        "forward_10": {"acc": 50.0, "acc_la": 50.0, "tau": 0.0}}}
    untuned = prior_block(names, taus, test, None, "val")  # never tuned on test
    assert untuned["tau_chosen_on"] is None
    assert all(v["acc_la"] == v["acc"] and v["tau"] == 0.0 for v in untuned["priors"].values())


def _calibrated_gaussians(per_class: int, seed: int):
    """x ~ N(mu_y, 1), mu = 0, 1, 2, equally many samples per class; p(y|x) of a calibrated model
    trained under the prior of counts (100, 10, 1)."""
    g = torch.Generator().manual_seed(seed)
    target = torch.arange(3).repeat_interleave(per_class)
    x = target.double() + torch.randn(len(target), generator=g, dtype=torch.float64)
    log_train = torch.log(torch.tensor([100.0, 10.0, 1.0], dtype=torch.float64) / 111)
    logits = -0.5 * (x[:, None] - torch.arange(3, dtype=torch.float64)) ** 2 + log_train
    return torch.softmax(logits, 1).float(), target


def test_post_hoc_adjustment_recovers_the_bayes_rule_under_shifted_priors():
    metrics = {}
    for split, seed in (("val", 0), ("test", 1)):
        metrics[split] = PriorShiftAccuracy([100, 10, 1], [10])
        metrics[split].update(*_calibrated_gaussians(4000, seed))
    val, test = (metrics[s].compute()["acc"] for s in ("val", "test"))
    bayes = TAU_GRID.index(1.0)  # tau 1 turns p(y|x) under the training prior into the target's posterior
    block = prior_block(metrics["test"].names, TAU_GRID, test, val, "val")["priors"]
    for p, name in enumerate(metrics["test"].names):
        assert test[p, bayes] >= test[p].max() - 0.3, name  # the Bayes rule is (nearly) the best tau on test
        assert 0.75 <= block[name]["tau"] <= 1.25, name  # and val finds it
        assert block[name]["acc_la"] >= test[p, bayes] - 0.3, name
    # The training prior is far from uniform and backward: the adjustment gains a lot there.
    assert block["uniform"]["acc_la"] > block["uniform"]["acc"] + 5
    assert block["backward_10"]["acc_la"] > block["backward_10"]["acc"] + 20


def test_metrics_json_block_and_plot(tmp_path):
    block = prior_block(["backward_2", "uniform", "forward_2"], [0.0, 1.0], torch.tensor([[1.0, 2], [3, 4], [5, 6]]),
                        torch.tensor([[0.0, 1], [1, 0], [0, 1]]), "val")
    results = {"test": {"acc": 3.0, "per_class": torch.tensor([3.0, 3.0]), "test_priors": block},
               "val": {"acc": 1.0, "per_class": torch.tensor([1.0, 1.0])}}
    write_metrics(tmp_path / "metrics.json", results, torch.tensor([5, 2]), None, "lpt")
    written = json.loads((tmp_path / "metrics.json").read_text())["results"]
    assert written["test"]["test_priors"] == block and "test_priors" not in written["val"]
    assert plot_test_priors(tmp_path / "p.png", results, "t") and (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert not plot_test_priors(tmp_path / "none.png", {"val": results["val"]}, "t")


def test_lpt_test_option_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lpt"])
    folder = tiny_image_folder(tmp_path / "imgs", (30, 20, 12, 8))
    backbone = asdict(tiny_backbone("visual"))
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(tmp_path)},
        "model": {"class_path": "lpt_lightning.phases.AdaptPhase",
                  "init_args": {"expert": {"kind": "visual", "backbone": backbone, "prompt_length": 2}}},
        "data": {"source": {"class_path": "lpt_lightning.data.ImageFolderSource",
                            "init_args": {"root": str(folder), "val_per_class": 3, "test_per_class": 2, "seed": 0,
                                          "name": "tiny"}},
                 "batch_size": 4, "num_workers": 0, "img_size": 32, "pin_memory": False},
    }
    path = tmp_path / "phase1.yaml"
    path.write_text(yaml.safe_dump(config))
    results = LPTCLI(args=["test", "--config", str(path), "--report.test_priors=[5, 25]"], **LPTCLI.defaults()).model.results
    assert set(results) == {"val", "test"}  # the val split is evaluated first, to choose tau on
    block = results["test"]["test_priors"]
    names = ["backward_25", "backward_5", "uniform", "forward_5", "forward_25"]
    assert block["tau_chosen_on"] == "val" and list(block["priors"]) == names
    assert all(set(v) == {"acc", "acc_la", "tau"} and v["tau"] in TAU_GRID for v in block["priors"].values())
    # Uniform, no adjustment: the plain accuracy of the (balanced) test set.
    assert block["priors"]["uniform"]["acc"] == pytest.approx(results["test"]["acc"], abs=1e-3)
    assert block["priors"]["uniform"]["acc"] == pytest.approx(results["test"]["balanced_acc"], abs=1e-3)
    chosen = select_tau(results["val"]["test_priors_grid"])
    for p, name in enumerate(names):
        assert block["priors"][name]["acc_la"] == pytest.approx(float(results["test"]["test_priors_grid"][p, chosen[p]]),
                                                                abs=1e-4)
    assert json.loads((tmp_path / "test_priors.json").read_text()) == {"test": block}
    assert (tmp_path / "test_priors.png").read_bytes()[:4] == b"\x89PNG"


@needs_fmnist
def test_pipeline_metrics_json_carries_the_blocks(tmp_path):
    from test_pipeline import TINY

    config = copy.deepcopy(TINY) | {"experts": ["visual"], "mixture": False, "test_priors": [10]}
    config["trainer"] |= {"limit_train_batches": 2, "log_every_n_steps": 1}  # the reports are under test, not the training
    for phase in ("phase1", "phase2"):
        config[phase]["trainer"]["max_epochs"] = 1
    run_pipeline(run_dir=str(tmp_path / "run"), **config)
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())["results"]
    tested = [row for row in summary if row.startswith("test")]
    assert tested == ["test: visual expert, no training", "test: visual expert, phase 1", "test: visual expert, phase 2"]
    for row in tested:
        block = summary[row]["test_priors"]
        assert block["tau_chosen_on"] in ("val", "val: no training")
        assert list(block["priors"]) == ["backward_10", "uniform", "forward_10"]
        assert block["priors"]["uniform"]["acc"] == pytest.approx(summary[row]["balanced_acc"], abs=1e-3)
    assert not any("test_priors" in v for row, v in summary.items() if row.startswith("val"))
    assert (tmp_path / "run" / "test_priors.png").read_bytes()[:4] == b"\x89PNG"
    recorded = yaml.safe_load((tmp_path / "run" / "phase2_visual" / "config.yaml").read_text())
    assert recorded["report"] == {"test_priors": [10]}
