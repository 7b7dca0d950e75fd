"""Phase 1 -> phase 2 on tiny random experts and real Fashion-MNIST-LT images."""

import lightning as L
import pytest
import torch

from lpt_lightning.checkpoints import load_checkpoint_file
from lpt_lightning.data import FashionMNISTSource, LongTailDataModule
from lpt_lightning.errors import CheckpointError, ConfigError
from lpt_lightning.metrics import SplitAccuracy
from lpt_lightning.models.expert import ExpertSpec, GroupPromptSpec
from lpt_lightning.phases import AdaptPhase, GroupPromptPhase, OptimSpec
from lpt_lightning.phases.base import instance_weight
from tiny_models import TIMM_TINY, tiny_backbone
from datasets_available import needs_fmnist

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
                     num_sanity_val_steps=0, default_root_dir=root, callbacks=list(callbacks))


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
    with pytest.raises(CheckpointError, match=r"phase2\.ckpt.*'group_prompt'.*expected an 'adapt'"):
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
        datamodule = type("DM", (), {"batch_size": 64})()
        world_size, accumulate_grad_batches, max_epochs = 2, 1, 10

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
    t = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=0, logger=False, enable_progress_bar=False,
                  enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0)
    t.fit(phase, datamodule=dm)  # no training step: the head is exactly the class means
    expert = phase.expert.eval()
    sums, counts = torch.zeros(10, expert.backbone.feature_dim), torch.zeros(10)
    with torch.no_grad():
        for batch in dm.split_dataloader("train"):
            sums.index_add_(0, batch["label"], expert(batch["image"]).features)
            counts.index_add_(0, batch["label"], torch.ones(len(batch["label"])))
    torch.testing.assert_close(expert.head.weight, torch.nn.functional.normalize(sums / counts[:, None], dim=-1))
