"""What `lpt test` reports: per-class tables and plots locally, and what W&B would receive."""
import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from lpt_lightning.data import FashionMNISTSource, LongTailDataModule
from lpt_lightning.data_facts import connect
from lpt_lightning.models.expert import ExpertSpec
from lpt_lightning.phases import AdaptPhase, OptimSpec
from lpt_lightning.reports import LoggedSaveConfig, SplitReport, per_class_rows
from tiny_models import tiny_backbone
from datasets_available import needs_fmnist



def test_per_class_rows_name_group_and_accuracy():
    counts = torch.tensor([150, 100, 21, 20, 3])
    results = {"test": {"per_class": torch.tensor([90.0, 80.0, float("nan"), 50.0, 0.0])}}
    columns, rows = per_class_rows(results, counts, ["a", "b", "c", "d", "e"], "lpt")
    assert columns == ["class", "name", "train_count", "group", "acc[test]"]
    assert rows == [[0, "a", 150, "many", 90.0], [1, "b", 100, "medium", 80.0], [2, "c", 21, "medium", None],
                    [3, "d", 20, "few", 50.0], [4, "e", 3, "few", 0.0]]
    assert [r[3] for r in per_class_rows(results, counts, None, "oltr")[1]] == ["many", "medium", "medium",
                                                                               "medium", "few"]


@needs_fmnist
def test_test_run_writes_local_reports_and_sends_tables_to_wandb(tmp_path, monkeypatch):
    logged = {"tables": {}, "images": {}, "metrics": set()}
    monkeypatch.setattr(WandbLogger, "log_table",
                        lambda self, key, columns=None, data=None, **kw: logged["tables"].__setitem__(key, (columns, data)))
    monkeypatch.setattr(WandbLogger, "log_image",
                        lambda self, key, images, **kw: logged["images"].__setitem__(key, images))
    monkeypatch.setattr(WandbLogger, "log_metrics", lambda self, metrics, step=None: logged["metrics"].update(metrics))
    dm = LongTailDataModule(FashionMNISTSource(imbalance_ratio=10, max_per_class=40, val_per_class=5,
                                               max_test_per_class=10), batch_size=16, num_workers=0)
    model = AdaptPhase(expert=ExpertSpec(kind="visual", backbone=tiny_backbone("visual"), prompt_length=2),
                       num_classes=10, class_names=dm.class_names, optim=OptimSpec(warmup_epochs=0))  # 1 epoch
    wandb = WandbLogger(project="lpt-test", save_dir=str(tmp_path), offline=True, mode="disabled")
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, enable_progress_bar=False,
                        logger=[CSVLogger(str(tmp_path), name="csv"), wandb], callbacks=[SplitReport(test_priors=[10])],
                        default_root_dir=tmp_path, enable_checkpointing=False)
    connect(model, dm)
    trainer.fit(model, datamodule=dm)
    trainer.validate(model, datamodule=dm, verbose=False)  # as `lpt test --report.test_priors` does first
    trainer.test(model, datamodule=dm, verbose=False)

    assert {"val/acc", "val/acc_many", "val/acc_medium", "val/acc_few", "test/acc", "test/acc_few"} <= logged["metrics"]
    assert {"test/top5", "test/balanced_acc", "test/worst_class_acc", "test/worst_class", "test/hmean", "test/gmean",
            "test/macro_f1", "test/nll", "test/ece", "test/ece_few", "val/balanced_acc_many"} <= logged["metrics"]
    for kind in ("reliability", "confusion"):  # one picture per row, beside the logs
        (picture,) = logged["images"][f"test/{kind}"]
        assert Path(picture).read_bytes()[:4] == b"\x89PNG" and Path(picture).parent.name == kind
    metric_columns, metric_rows = logged["tables"]["test/metrics"]
    assert metric_columns[:3] == ["row", "top5", "top5_many"] and metric_rows[0][0] == "test"
    assert metric_rows[0][metric_columns.index("balanced_acc")] == pytest.approx(
        model.results["test"]["balanced_acc"], abs=1e-3)
    columns, rows = logged["tables"]["test/per_class"]
    assert columns == ["class", "name", "train_count", "group", "acc[test]"] and len(rows) == 10
    assert rows[0][1] == "T-shirt/top" and rows[0][2] == int(dm.train_class_counts[0])
    summary_columns, summary = logged["tables"]["test/split_accuracy"]
    assert summary_columns == ["row", "overall", "many", "medium", "few"] and summary[0][0] == "test"
    assert summary[0][1] == pytest.approx(model.results["test"]["acc"], abs=1e-3)
    plot = Path(logged["images"]["test/per_class_accuracy"][0])
    assert plot.read_bytes()[:4] == b"\x89PNG"
    # The CSV-only path has the same table beside the logs.
    local = list(csv.reader(open(plot.with_name("per_class_test.csv"))))
    assert local[0] == columns and len(local) == 11
    # --report.test_priors: the plot goes to W&B beside the others, tau chosen on fit's val row.
    (priors,) = logged["images"]["test/test_priors"]
    assert Path(priors).read_bytes()[:4] == b"\x89PNG"
    block = model.results["test"]["test_priors"]
    assert block["tau_chosen_on"] == "val" and list(block["priors"]) == ["backward_10", "uniform", "forward_10"]


def test_resolved_config_goes_to_wandb(monkeypatch):
    received = {}
    monkeypatch.setattr(WandbLogger, "log_hyperparams", lambda self, params: received.update(params))
    logger = WandbLogger(project="lpt-test", offline=True, mode="disabled")
    from jsonargparse import Namespace

    config = Namespace(model=Namespace(class_path="lpt_lightning.phases.AdaptPhase"), seed_everything=0)
    callback = LoggedSaveConfig(parser=None, config=config)
    callback.save_config(type("T", (), {"loggers": [logger]})(), None, "fit")
    assert received == {"model": {"class_path": "lpt_lightning.phases.AdaptPhase"}, "seed_everything": 0}
