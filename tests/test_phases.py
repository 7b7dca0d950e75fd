"""Phase 1 -> phase 2 on tiny random experts and real Fashion-MNIST-LT images."""
import csv
import logging
import math
import sys
from dataclasses import asdict

import lightning as L
import pytest
import torch

from lpt_lightning.callbacks import ClassMeanHeadInit, default_callbacks
from lpt_lightning.checkpoints import load_checkpoint_file
from lpt_lightning.cli import main
from lpt_lightning.data import FashionMNISTSource, LongTailDataModule
from lpt_lightning.data_facts import DataFacts, connect
from lpt_lightning.errors import CheckpointError, ConfigError
from lpt_lightning.metrics import SplitAccuracy
from lpt_lightning.models.expert import ExpertSpec, GroupPromptSpec
from lpt_lightning.phases import AdaptPhase, GroupPromptPhase, OptimSpec
from lpt_lightning.phases.base import instance_weight
from tiny_models import TIMM_TINY, tiny_backbone
from datasets_available import needs_fmnist
from test_cli import REPO, console_output

GROUP = GroupPromptSpec(pool_size=6, top_k=2, start_block=2, length=3)
OPTIM = OptimSpec(base_lr=1.0, warmup_epochs=0)


def datamodule():
    source = FashionMNISTSource(imbalance_ratio=10, max_per_class=60, val_per_class=10, max_test_per_class=10)
    return LongTailDataModule(source, batch_size=16, num_workers=0, seed=0)


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append((trainer.current_epoch, float(outputs["loss"])))

    def epoch_mean(self, epoch):
        values = [v for e, v in self.losses if e == epoch]
        return sum(values) / len(values)


def trainer(root, epochs, callbacks=()):
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, precision="32-true", logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, default_root_dir=root, callbacks=[*callbacks, *default_callbacks()])


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, after, prefix):
    keys = [k for k in before if k.startswith(prefix)]
    assert keys, prefix
    return any(not torch.equal(before[k], after[k]) for k in keys)


def eval_logits(expert, loader, **kwargs):
    expert.eval()
    with torch.no_grad():
        return torch.cat([expert(b["image"], **kwargs).logits for b in loader])


@needs_fmnist
@pytest.mark.parametrize("kind", ["visual", "vl"])
def test_phase1_then_phase2(tmp_path, kind):
    torch.manual_seed(0)
    dm = datamodule()
    spec = ExpertSpec(kind=kind, backbone=tiny_backbone(kind), prompt_length=3)
    phase1 = AdaptPhase(expert=spec, num_classes=dm.num_classes, class_names=dm.class_names, optim=OPTIM)
    connect(phase1, dm)
    before = snapshot(phase1)
    recorder = LossRecorder()
    t1 = trainer(tmp_path, 4, [recorder])
    t1.fit(phase1, datamodule=dm)
    after = snapshot(phase1)
    assert recorder.epoch_mean(3) < recorder.epoch_mean(0)
    assert not changed(before, after, "expert.backbone.")
    for trained in ("expert.shared_prompt.", "expert.adapters.", "expert.head."):
        assert changed(before, after, trained), trained

    ckpt1 = tmp_path / "phase1.ckpt"
    t1.save_checkpoint(ckpt1)
    saved = load_checkpoint_file(ckpt1)
    assert saved["lpt"]["phase"] == "adapt" and saved["lpt"]["expert"]["kind"] == kind
    assert not any(k.startswith("expert.backbone.") for k in saved["state_dict"])
    assert ckpt1.stat().st_size < 200_000  # trainable tensors only

    # Hand-over: before any step, phase 2's phase-1 path reproduces phase 1 exactly.
    phase2 = GroupPromptPhase(phase1_checkpoint=str(ckpt1), group_prompts=GROUP, num_classes=dm.num_classes,
                              optim=OPTIM)
    connect(phase2, dm)
    val_loader = dm.val_dataloader()
    reference = eval_logits(phase1.expert, val_loader)
    assert torch.equal(eval_logits(phase2.expert, val_loader, use_group_prompts=False), reference)
    t1.validate(phase1, datamodule=dm, verbose=False)
    labels = torch.cat([b["label"] for b in val_loader])
    metric = SplitAccuracy(dm.train_class_counts)
    metric.update(reference, labels)
    assert float(metric.compute()["acc"]) == pytest.approx(phase1.results["val"]["acc"])

    before = snapshot(phase2)
    recorder = LossRecorder()
    trainer(tmp_path, 3, [recorder]).fit(phase2, datamodule=dm)
    after = snapshot(phase2)
    for frozen in ("expert.backbone.", "expert.shared_prompt.", "expert.adapters."):
        assert not changed(before, after, frozen), frozen
    for trained in ("expert.group_prompts.prompts", "expert.group_prompts.keys", "expert.head."):
        assert changed(before, after, trained), trained
    assert recorder.epoch_mean(2) < recorder.epoch_mean(0)
    # The query branch is still exactly phase 1's feature.
    images = next(iter(val_loader))["image"]
    phase1.expert.eval(), phase2.expert.eval()
    with torch.no_grad():
        torch.testing.assert_close(phase2.expert(images).query, phase1.expert(images).features, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def phase1_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("p1") / "phase1.ckpt"
    spec = ExpertSpec(kind="visual", backbone=tiny_backbone("visual"), prompt_length=3)
    phase = AdaptPhase(expert=spec, num_classes=5)
    torch.save({"state_dict": phase.state_dict(), "lpt": phase.metadata()}, path)
    return path


def test_phase2_refuses_checkpoint_of_wrong_phase(tmp_path, phase1_checkpoint):
    phase2 = GroupPromptPhase(phase1_checkpoint=str(phase1_checkpoint), group_prompts=GROUP, num_classes=5)
    wrong = tmp_path / "phase2.ckpt"
    torch.save({"state_dict": phase2.state_dict(), "lpt": phase2.metadata()}, wrong)
    with pytest.raises(CheckpointError, match=r"phase2\.ckpt.*'group_prompt'.*expected a checkpoint of phase 'adapt'"):
        GroupPromptPhase(phase1_checkpoint=str(wrong), num_classes=5)


def test_phase2_refuses_wrong_class_count(phase1_checkpoint):
    with pytest.raises(ConfigError, match=r"trained for 5 classes, but the data has 7"):
        GroupPromptPhase(phase1_checkpoint=str(phase1_checkpoint), num_classes=7)


def test_phase2_refuses_another_backbone(phase1_checkpoint):
    other = tiny_backbone("visual")
    other.model_kwargs = dict(TIMM_TINY, embed_dim=48)
    spec = ExpertSpec(kind="visual", backbone=other, prompt_length=3)
    with pytest.raises(ConfigError, match=r"differs .* in \['backbone'\]"):
        GroupPromptPhase(phase1_checkpoint=str(phase1_checkpoint), expert=spec, num_classes=5)


def test_phase2_refuses_foreign_and_missing_files(tmp_path):
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not an lpt_lightning phase checkpoint"):
        GroupPromptPhase(phase1_checkpoint=str(foreign), num_classes=5)
    with pytest.raises(CheckpointError, match="not found"):
        GroupPromptPhase(phase1_checkpoint=str(tmp_path / "missing.ckpt"), num_classes=5)


def test_vl_phase1_needs_class_names():
    spec = ExpertSpec(kind="vl", backbone=tiny_backbone("vl"), prompt_length=3)
    with pytest.raises(ConfigError, match="needs class names"):
        AdaptPhase(expert=spec, num_classes=5)


def test_instance_weight_schedule():
    assert [instance_weight(e, 4, 0.5) for e in range(4)] == [0.5, 0.375, 0.25, 0.125]


def test_learning_rate_scales_with_global_batch_and_warms_up():
    phase = AdaptPhase(expert=ExpertSpec(kind="visual", backbone=tiny_backbone("visual")), num_classes=5,
                       optim=OptimSpec(base_lr=0.02, warmup_epochs=1, warmup_lr=1e-6))

    class FakeTrainer:
        world_size, accumulate_grad_batches, max_epochs = 2, 1, 10

    phase.attach_data(DataFacts(group_class_counts=torch.ones(5), train_class_counts=torch.ones(5), record={},
                                batch_size=64))
    phase._trainer = FakeTrainer()
    config = phase.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-6)  # warm-up epoch starts at 1e-6
    scheduler.step(epoch=1)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.02 * 128 / 256 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi / 10)).item()))
    assert optimizer.param_groups[0]["momentum"] == 0.9 and optimizer.param_groups[0]["weight_decay"] == 0.01


@needs_fmnist
def test_class_mean_head_init(tmp_path):
    dm = datamodule()
    spec = ExpertSpec(kind="visual", backbone=tiny_backbone("visual"), prompt_length=3, head_init="class_mean")
    phase = AdaptPhase(expert=spec, num_classes=dm.num_classes, optim=OPTIM)
    connect(phase, dm)
    t = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=0, logger=False, enable_progress_bar=False,
                  enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
                  callbacks=[ClassMeanHeadInit()])
    t.fit(phase, datamodule=dm)  # no training step: the head is exactly the class means
    expert = phase.expert.eval()
    sums, counts = torch.zeros(10, expert.backbone.feature_dim), torch.zeros(10)
    with torch.no_grad():
        for batch in dm.split_dataloader("train"):
            sums.index_add_(0, batch["label"], expert(batch["image"]).features)
            counts.index_add_(0, batch["label"], torch.ones(len(batch["label"])))
    torch.testing.assert_close(expert.head.weight, torch.nn.functional.normalize(sums / counts[:, None], dim=-1))


# ----------------------------------------------------------------------------- artefacts that stand alone
@pytest.fixture(scope="module")
def trained_pair(tmp_path_factory):
    """Phase 1 then phase 2 (a few batches each) on Fashion-MNIST-LT, with the model of the CPU configs."""
    root = tmp_path_factory.mktemp("pair")
    dm = LongTailDataModule(FashionMNISTSource(imbalance_ratio=100, max_per_class=300, val_per_class=20,
                                               max_test_per_class=100, seed=0), batch_size=32, num_workers=0, seed=0)
    L.seed_everything(0)
    phase1 = AdaptPhase(expert=CPU_EXPERT, num_classes=10, class_names=dm.class_names, optim=OPTIM)
    connect(phase1, dm)
    t1 = trainer(root, 1)
    t1.limit_train_batches = 3
    t1.fit(phase1, datamodule=dm)
    t1.save_checkpoint(root / "phase1.ckpt")
    L.seed_everything(0)
    phase2 = GroupPromptPhase(phase1_checkpoint=str(root / "phase1.ckpt"), group_prompts=CPU_GROUP, num_classes=10,
                              class_names=dm.class_names, optim=OPTIM)
    connect(phase2, dm)
    t2 = trainer(root, 1)
    t2.limit_train_batches = 3
    t2.fit(phase2, datamodule=dm)
    t2.save_checkpoint(root / "phase2.ckpt")
    return root, dm, phase1, phase2


CPU_EXPERT = ExpertSpec(kind="visual", backbone=tiny_backbone("visual"), prompt_length=4, adapter_bottleneck=8)
CPU_GROUP = GroupPromptSpec(pool_size=10, top_k=2, start_block=2, length=4)


@needs_fmnist
def test_phase_checkpoints_load_in_a_notebook_without_phase1(trained_pair, tmp_path):
    root, dm, phase1, phase2 = trained_pair
    images = next(iter(dm.test_dataloader()))["image"]
    loaded1 = AdaptPhase.load_from_checkpoint(root / "phase1.ckpt", weights_only=True)
    # The phase-2 checkpoint alone: its phase-1 file is gone.
    alone = tmp_path / "phase2.ckpt"
    alone.write_bytes((root / "phase2.ckpt").read_bytes())
    renamed = root / "phase1.moved"
    (root / "phase1.ckpt").rename(renamed)
    try:
        loaded2 = GroupPromptPhase.load_from_checkpoint(alone, weights_only=True)
    finally:
        renamed.rename(root / "phase1.ckpt")
    for original, loaded in ((phase1, loaded1), (phase2, loaded2)):
        assert type(loaded) is type(original) and loaded.num_classes == 10
        assert loaded.class_names == dm.class_names and loaded.hparams["expert"] == asdict(CPU_EXPERT)
        with torch.no_grad():
            assert torch.equal(loaded.expert.eval()(images).logits, original.expert.eval()(images).logits)
    assert loaded2.group_spec == CPU_GROUP and torch.equal(loaded2.class_counts, phase2.class_counts)


@needs_fmnist
def test_phase2_rebuilt_from_its_spec_needs_its_checkpoint(trained_pair, tmp_path):
    root, dm, _, phase2 = trained_pair
    assert phase2.hparams["phase1_checkpoint"] is None  # a rebuild never reads phase 1
    assert load_checkpoint_file(root / "phase2.ckpt")["lpt"]["phase1_checkpoint"] == str(root / "phase1.ckpt")
    rebuilt = GroupPromptPhase(expert=CPU_EXPERT, group_prompts=CPU_GROUP, num_classes=10)
    connect(rebuilt, dm)
    with pytest.raises(ConfigError, match="no trained tensors: give a phase-2 checkpoint"):
        trainer(tmp_path, 1).test(rebuilt, datamodule=dm, verbose=False)
    t = trainer(tmp_path, 1)
    t.test(rebuilt, datamodule=dm, verbose=False, ckpt_path=root / "phase2.ckpt")
    t.test(phase2, datamodule=dm, verbose=False)
    assert rebuilt.results["test"]["acc"] == phase2.results["test"]["acc"]


@needs_fmnist
def test_lpt_test_and_predict_a_phase2_checkpoint_whose_phase1_is_gone(trained_pair, tmp_path, monkeypatch, capsys,
                                                                       caplog):
    root, dm, _, phase2 = trained_pair
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lpt"])  # LightningCLI warns when it sees pytest's command line
    caplog.set_level(logging.INFO)
    config = str(REPO / "configs" / "cpu" / "fmnist_lt_phase2.yaml")  # names runs/.../phase1_visual: absent here
    assert not (tmp_path / "runs").exists()
    main(["test", "--config", config, "--ckpt_path", str(root / "phase2.ckpt"), "--trainer.enable_progress_bar=false"])
    text = console_output(capsys, caplog)
    row = next(line for line in text[text.index("Split accuracy"):].splitlines() if line.startswith("test "))
    t = trainer(tmp_path, 1)
    t.test(phase2, datamodule=dm, verbose=False)
    assert float(row.split()[1]) == pytest.approx(phase2.results["test"]["acc"], abs=0.01)
    out = tmp_path / "preds.csv"
    main(["predict", "--config", config, "--ckpt_path", str(root / "phase2.ckpt"),
          "--trainer.enable_progress_bar=false", f"--prediction.output={out}"])
    rows = list(csv.DictReader(out.read_text().splitlines()))
    phase2.eval()  # as `lpt predict` runs it (the trainer.test above leaves it in training mode)
    with torch.no_grad():
        probs = torch.cat([phase2.predict_step(b, 0)["probs"] for b in dm.test_dataloader()])
    assert len(rows) == len(probs) and [int(r["top1_class"]) for r in rows] == probs.argmax(-1).tolist()


def cli_test_row(args, capsys, caplog) -> str:
    """``lpt test ARGS``: the printed ``test`` row of the split-accuracy table."""
    caplog.clear()
    main(["test", *args, "--trainer.enable_progress_bar=false"])
    text = console_output(capsys, caplog)
    return next(line for line in text[text.index("Split accuracy"):].splitlines() if line.startswith("test "))


@needs_fmnist
def test_lpt_test_ckpt_path_last_of_a_phase2_run_whose_phase1_run_is_deleted(trained_pair, tmp_path, monkeypatch,
                                                                            capsys, caplog):
    """``--ckpt_path=last`` is resolved to the run's file before the model is built, so the model
    comes from that checkpoint's hyperparameters as for an explicit path: no phase-1 file is read
    (the config names the deleted phase-1 run's last.ckpt; the one phase 2 started from is moved away)."""
    root, dm, _, phase2 = trained_pair
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lpt"])
    caplog.set_level(logging.INFO)
    run = tmp_path / "runs" / "fmnist_lt" / "phase2_visual" / "checkpoints"  # where the config's phase 2 writes
    run.mkdir(parents=True)
    (run / "last.ckpt").write_bytes((root / "phase2.ckpt").read_bytes())
    assert not (tmp_path / "runs" / "fmnist_lt" / "phase1_visual").exists()
    config = ["--config", str(REPO / "configs" / "cpu" / "fmnist_lt_phase2.yaml")]
    moved = root / "phase1.moved"
    (root / "phase1.ckpt").rename(moved)
    try:
        last = cli_test_row([*config, "--ckpt_path=last"], capsys, caplog)
        explicit = cli_test_row([*config, "--ckpt_path", str(run / "last.ckpt")], capsys, caplog)
    finally:
        moved.rename(root / "phase1.ckpt")
    assert last == explicit
    t = trainer(tmp_path, 1)
    t.test(phase2, datamodule=dm, verbose=False)
    assert float(last.split()[1]) == pytest.approx(phase2.results["test"]["acc"], abs=0.01)


@needs_fmnist
def test_lpt_fit_ckpt_path_last_resumes_the_run(tmp_path, monkeypatch):
    """``lpt fit --ckpt_path=last`` resumes the run in the config's checkpoint directory: a 2-epoch
    run stopped after its first epoch trains the second one from its step, and last.ckpt is the resumed run's."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lpt"])
    fit = ["fit", "--config", str(REPO / "configs" / "cpu" / "fmnist_lt_phase1.yaml"), "--trainer.limit_train_batches=3",
           "--trainer.limit_val_batches=1", "--trainer.max_epochs=2", "--trainer.enable_progress_bar=false"]
    main([*fit, "--trainer.max_steps=3"])  # as if stopped after the first epoch
    run = tmp_path / "runs" / "fmnist_lt" / "phase1_visual" / "checkpoints"
    first = load_checkpoint_file(run / "last.ckpt")
    main([*fit, "--ckpt_path=last"])
    resumed = load_checkpoint_file(run / "last.ckpt")
    assert (first["global_step"], resumed["global_step"]) == (3, 6)  # only the second epoch ran
    assert changed(first["state_dict"], resumed["state_dict"], "expert.shared_prompt.")


# ----------------------------------------------------------------- schedule over the run's real length
class ScheduleRecorder(L.Callback):
    """(epoch, optimizer step, lr, eta) of every training batch, read before its optimizer step."""

    def __init__(self):
        self.rows = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rows.append((trainer.current_epoch, trainer.global_step, trainer.optimizers[0].param_groups[0]["lr"],
                          pl_module.stream_weight("ib", ["cb", "ib"])))


def scheduled_run(tmp_path, optim, **trainer_args):
    torch.manual_seed(0)
    dm = datamodule()
    phase = AdaptPhase(expert=ExpertSpec(kind="visual", backbone=tiny_backbone("visual"), prompt_length=2),
                       num_classes=dm.num_classes, optim=optim)
    connect(phase, dm)
    recorder = ScheduleRecorder()
    t = L.Trainer(accelerator="cpu", devices=1, precision="32-true", logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                  default_root_dir=tmp_path, callbacks=[recorder], **trainer_args)
    t.fit(phase, datamodule=dm)
    return phase, recorder.rows


def cosine(step, total, peak, warmup=0, start=1e-6):
    if step < warmup:
        return start + step * (peak - start) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * step / total))


SCHEDULE_OPTIM = OptimSpec(base_lr=0.5, warmup_epochs=1, warmup_lr=1e-6)
PEAK = 0.5 * 16 / 256  # base_lr x per-stream batch / 256


@needs_fmnist
def test_step_budgeted_run_schedules_over_its_steps(tmp_path):
    # max_steps: Lightning reports max_epochs=-1; 10 steps over 3 epochs of 4, warm-up = 1 epoch = 4 steps.
    phase, rows = scheduled_run(tmp_path, SCHEDULE_OPTIM, max_steps=10, limit_train_batches=4)
    assert phase.trainer.max_epochs == -1 and phase.schedule_steps == 10
    assert [step for _, step, _, _ in rows] == list(range(10)) and rows[-1][0] == 2
    for _, step, lr, eta in rows:
        assert lr == pytest.approx(cosine(step, 10, PEAK, warmup=4)), step
        assert eta == pytest.approx(0.5 * (10 - step) / 10) and 0 <= eta <= 0.5
    # Out of the warm-up the lr is the cosine's, never 0 (it was 0 from the 2nd epoch when the
    # schedule counted epochs of a run Lightning reports as max_epochs=-1).
    assert rows[4][2] > 0.5 * PEAK and all(lr > 0 for _, _, lr, _ in rows)
    # A warm-up as long as the run is refused, naming both options.
    with pytest.raises(ConfigError, match=r"optim\.warmup_epochs=1 .*trainer\.max_steps=4"):
        scheduled_run(tmp_path, SCHEDULE_OPTIM, max_steps=4, limit_train_batches=4)


@needs_fmnist
def test_one_epoch_run_schedules_over_its_steps(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.warmup_epochs=1 .*trainer\.max_epochs=1"):
        scheduled_run(tmp_path, SCHEDULE_OPTIM, max_epochs=1, limit_train_batches=6)
    phase, rows = scheduled_run(tmp_path, OptimSpec(base_lr=0.5, warmup_epochs=0), max_epochs=1,
                                limit_train_batches=6)
    assert phase.schedule_steps == 6 and [step for _, step, _, _ in rows] == list(range(6))
    for _, step, lr, eta in rows:
        assert lr == pytest.approx(cosine(step, 6, PEAK)) and lr > 0, step
        assert eta == pytest.approx(0.5 * (6 - step) / 6) and 0 < eta <= 0.5


@needs_fmnist
def test_epoch_bounded_run_keeps_the_per_epoch_schedule(tmp_path):
    """max_epochs >= 2: the lr and eta of SPEC 4's per-epoch schedule, bit for bit as before."""
    from timm.scheduler import CosineLRScheduler

    epochs = 3
    phase, rows = scheduled_run(tmp_path, SCHEDULE_OPTIM, max_epochs=epochs, limit_train_batches=3)
    assert getattr(phase, "schedule_steps", None) is None  # scheduled per epoch
    # The schedule as it was built before runs were scheduled per step.
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)
    reference = CosineLRScheduler(optimizer, t_initial=epochs, lr_min=0.0, warmup_t=1, warmup_lr_init=1e-6,
                                  t_in_epochs=True)
    expected_lr = []
    for epoch in range(epochs):
        expected_lr.append(optimizer.param_groups[0]["lr"])
        reference.step(epoch=epoch + 1)
    assert [(e, lr, eta) for e, _, lr, eta in rows] == [
        (e, expected_lr[e], 0.5 * (epochs - e) / epochs) for e in range(epochs) for _ in range(3)]
    assert expected_lr[1] > 0.01 and expected_lr[0] == 1e-6


def test_instance_weight_is_clamped():
    assert instance_weight(5, 4, 0.5) == 0.0 and instance_weight(0, 4, 0.5) == 0.5
    assert instance_weight(4, 0, 0.5) == 0.0 and instance_weight(-1, 4, 0.5) == 0.5


def test_head_anchor_penalty_by_hand():
    """loss.head_anchor: a * mean_c ||w_c/|w_c| - w0_c/|w0_c|||^2 against the head at train start
    (normalised once there), 0 for the start head itself, off (None) by default."""
    from lpt_lightning.phases import LossSpec

    spec = ExpertSpec(kind="visual", backbone=tiny_backbone("visual"), prompt_length=2)
    assert AdaptPhase(expert=spec, num_classes=4).head_penalty() is None
    phase = AdaptPhase(expert=spec, num_classes=4, loss=LossSpec(head_anchor=0.5))
    phase.start_state = {"expert.head.weight": phase.expert.head.weight.detach().clone()}
    phase.set_anchor_head()
    assert float(phase.head_penalty()) == 0.0
    w0 = phase.start_state["expert.head.weight"]
    with torch.no_grad():
        phase.expert.head.weight.add_(torch.randn_like(w0))
    w = phase.expert.head.weight.detach()
    expected = 0.5 * sum(float(((w[c] / w[c].norm() - w0[c] / w0[c].norm()) ** 2).sum()) for c in range(4)) / 4
    assert float(phase.head_penalty()) == pytest.approx(expected, rel=1e-5)
    phase.head_penalty().backward()  # the gradient reaches the head, not the fixed start
    assert phase.expert.head.weight.grad.abs().sum() > 0
