"""Exact resumption: a phase killed mid-epoch and resumed ends where an uninterrupted run ends."""

import lightning as L
import pytest
import torch
from lightning.pytorch.cli import instantiate_module

from lpt_lightning.callbacks import default_callbacks
from lpt_lightning.data import FashionMNISTSource, LongTailDataModule
from lpt_lightning.errors import ConfigError
from lpt_lightning.data_facts import connect
from lpt_lightning.models.expert import ExpertSpec, GroupPromptSpec
from lpt_lightning.phases import AdaptPhase, GroupPromptPhase, OptimSpec
from tiny_models import tiny_backbone
from datasets_available import needs_fmnist

pytestmark = needs_fmnist


class KillAfter(L.Callback):
    """Saves a checkpoint after a given batch of a given epoch, then dies (like SIGKILL would,
    the checkpoint standing in for the last one written before the kill)."""

    def __init__(self, path, epoch, batch):
        self.path, self.epoch, self.batch = path, epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            trainer.save_checkpoint(self.path)
            raise RuntimeError("killed")


def datamodule(num_workers=0):
    source = FashionMNISTSource(imbalance_ratio=10, max_per_class=40, val_per_class=5, max_test_per_class=5)
    return LongTailDataModule(source, batch_size=16, num_workers=num_workers, seed=3)


def fit(module, root, epochs, callbacks=(), ckpt_path=None, num_workers=0, **trainer_args):
    L.seed_everything(7)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                        callbacks=[*callbacks, *default_callbacks()], **trainer_args)
    data = datamodule(num_workers)
    connect(module, data)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer


def trained(module):
    return {k: v for k, v in module.state_dict().items() if "backbone" not in k}


def phase1(head_init="auto", warmup_epochs=1):
    L.seed_everything(0)  # as `lpt fit` does before building the model: same initial prompts
    spec = ExpertSpec(kind="visual", backbone=tiny_backbone("visual"), prompt_length=3, head_init=head_init)
    return AdaptPhase(expert=spec, num_classes=10, optim=OptimSpec(base_lr=0.5, warmup_epochs=warmup_epochs))


@pytest.mark.parametrize("num_workers", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_phase1_killed_mid_epoch_resumes_exactly(tmp_path, num_workers):
    reference = phase1()
    fit(reference, tmp_path, 3, num_workers=num_workers)

    ckpt = tmp_path / "killed.ckpt"
    interrupted = phase1()
    with pytest.raises(RuntimeError, match="killed"):
        fit(interrupted, tmp_path, 3, [KillAfter(ckpt, epoch=1, batch=2)], num_workers=num_workers)
    resumed = phase1()  # a fresh process would build the model from config, then load the checkpoint
    trainer = fit(resumed, tmp_path, 3, ckpt_path=ckpt, num_workers=num_workers)
    assert trainer.current_epoch == 3
    for key, value in trained(reference).items():
        assert torch.equal(value, trained(resumed)[key]), key
    for key in ("acc", "acc_many", "acc_medium", "acc_few"):
        assert resumed.results["val"][key] == pytest.approx(reference.results["val"][key], nan_ok=True)


def test_phase1_with_gradient_accumulation_resumes_exactly(tmp_path):
    reference = phase1()
    fit(reference, tmp_path, 2, accumulate_grad_batches=2)
    ckpt = tmp_path / "killed.ckpt"
    with pytest.raises(RuntimeError, match="killed"):  # after the first window of epoch 1
        fit(phase1(), tmp_path, 2, [KillAfter(ckpt, epoch=1, batch=1)], accumulate_grad_batches=2)
    resumed = phase1()
    fit(resumed, tmp_path, 2, ckpt_path=ckpt, accumulate_grad_batches=2)
    for key, value in trained(reference).items():
        assert torch.equal(value, trained(resumed)[key]), key


def test_phase1_with_a_class_mean_head_resumes_exactly(tmp_path):
    """The class means initialise the head of a fresh run only: a resumed run keeps the restored head
    (Lightning restores the step count after on_fit_start, so the step cannot tell them apart)."""
    reference = phase1("class_mean")
    fit(reference, tmp_path, 2)
    ckpt = tmp_path / "killed.ckpt"
    with pytest.raises(RuntimeError, match="killed"):
        fit(phase1("class_mean"), tmp_path, 2, [KillAfter(ckpt, epoch=1, batch=1)])
    resumed = phase1("class_mean")
    fit(resumed, tmp_path, 2, ckpt_path=ckpt)
    for key, value in trained(reference).items():
        assert torch.equal(value, trained(resumed)[key]), key


class RngRecorder(AdaptPhase):
    """Phase 1 that records the generator state each training step starts from (its noise and dropout)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rng_states = []

    def training_step(self, batch, batch_idx):
        self.rng_states.append(torch.random.get_rng_state())
        return super().training_step(batch, batch_idx)


def test_each_micro_batch_of_an_accumulation_window_draws_its_own_noise(tmp_path):
    L.seed_everything(0)
    spec = ExpertSpec(kind="visual", backbone=tiny_backbone("visual"), prompt_length=3)
    # One epoch: no warm-up (a warm-up as long as the run is refused).
    module = RngRecorder(expert=spec, num_classes=10, optim=OptimSpec(base_lr=0.5, warmup_epochs=0))
    fit(module, tmp_path, 1, accumulate_grad_batches=2, limit_train_batches=4, limit_val_batches=0)
    states = module.rng_states
    assert len(states) == 4
    assert all(not torch.equal(states[a], states[b]) for a in range(4) for b in range(a))


class DrawRecorder(L.LightningModule):
    """Records what each training step receives: per stream the image indices and a pixel checksum."""

    img_size = 8

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.steps = []

    def training_step(self, batch, batch_idx):
        self.steps.append((self.current_epoch, batch_idx, {
            stream: (b["index"].tolist(), b["image"].dtype, int(b["image"].sum())) for stream, b in batch.items()}))
        return self.layer(batch["cb"]["image"].float().mean(dim=(2, 3))).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class KillAtEpochEnd(L.Callback):
    """Saves a checkpoint at the end of a given epoch (as ModelCheckpoint's last.ckpt is), then dies."""

    def __init__(self, path, epoch):
        self.path, self.epoch = path, epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.save_checkpoint(self.path)
            raise RuntimeError("killed")


@pytest.mark.parametrize("kill, num_workers", [("mid-epoch", 2), ("last batch", 0), ("epoch end", 0),
                                                ("epoch end", 2)])
def test_resumed_loader_continues_with_the_next_step_of_every_stream(tmp_path, kill, num_workers):
    """One stateful loader: a run resumed mid-epoch, after an epoch's last batch or from an epoch-end
    checkpoint sees exactly the batches (both streams, their augmentations) an uninterrupted run
    sees next. With workers, the epoch-end case needs the DataModule's epoch record: Lightning creates
    the first iterator, whose workers prefetch, before it calls set_epoch."""
    limits = {"limit_val_batches": 0, "num_sanity_val_steps": 0}
    reference = DrawRecorder()
    fit(reference, tmp_path, 3, num_workers=num_workers, **limits)
    per_epoch = len(reference.steps) // 3
    assert per_epoch == 9 and all(dtype == torch.uint8 for *_, streams in reference.steps
                                   for _, dtype, _ in streams.values())

    ckpt = tmp_path / "killed.ckpt"
    killer = {"mid-epoch": KillAfter(ckpt, epoch=1, batch=5), "last batch": KillAfter(ckpt, epoch=1, batch=8),
              "epoch end": KillAtEpochEnd(ckpt, epoch=1)}[kill]
    with pytest.raises(RuntimeError, match="killed"):
        fit(DrawRecorder(), tmp_path, 3, [killer], num_workers=num_workers, **limits)
    resumed = DrawRecorder()
    fit(resumed, tmp_path, 3, ckpt_path=ckpt, num_workers=num_workers, **limits)
    done = per_epoch + 6 if kill == "mid-epoch" else 2 * per_epoch
    assert resumed.steps == reference.steps[done:]


def test_resuming_mid_epoch_with_another_worker_count_is_refused(tmp_path):
    ckpt = tmp_path / "killed.ckpt"
    limits = {"limit_val_batches": 0, "num_sanity_val_steps": 0}
    with pytest.raises(RuntimeError, match="killed"):
        fit(DrawRecorder(), tmp_path, 2, [KillAfter(ckpt, epoch=0, batch=3)], num_workers=0, **limits)
    with pytest.raises(ConfigError, match=r"mid-epoch with data.num_workers=0; resume with that worker count"):
        fit(DrawRecorder(), tmp_path, 2, ckpt_path=ckpt, num_workers=1, **limits)


def test_phase2_killed_mid_epoch_resumes_exactly(tmp_path):
    first = phase1(warmup_epochs=0)  # one epoch: no warm-up (as long as the run: refused)
    trainer = fit(first, tmp_path, 1)
    p1 = tmp_path / "phase1.ckpt"
    trainer.save_checkpoint(p1)
    group = GroupPromptSpec(pool_size=4, top_k=2, start_block=2, length=3)

    def make():
        L.seed_everything(0)
        return GroupPromptPhase(phase1_checkpoint=str(p1), group_prompts=group, num_classes=10,
                                optim=OptimSpec(base_lr=0.5, warmup_epochs=0))

    reference = make()
    fit(reference, tmp_path, 2)
    ckpt = tmp_path / "killed2.ckpt"
    with pytest.raises(RuntimeError, match="killed"):
        fit(make(), tmp_path, 2, [KillAfter(ckpt, epoch=0, batch=4)])
    resumed = make()
    fit(resumed, tmp_path, 2, ckpt_path=ckpt)
    for key, value in trained(reference).items():
        assert torch.equal(value, trained(resumed)[key]), key
    # As `lpt fit --ckpt_path` rebuilds it, from the checkpoint's hyperparameters: phase 1 unread.
    p1.unlink()
    hparams = torch.load(ckpt, weights_only=True)["hyper_parameters"]
    L.seed_everything(1)  # another initialisation: every tensor must come from the checkpoint
    rebuilt = instantiate_module(GroupPromptPhase, {k: v for k, v in hparams.items() if k != "_instantiator"})
    fit(rebuilt, tmp_path, 2, ckpt_path=ckpt)
    for key, value in trained(reference).items():
        assert torch.equal(value, trained(rebuilt)[key]), key
