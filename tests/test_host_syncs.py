"""No host sync in a steady-state training step of any phase, nor per evaluation batch.

A `TorchDispatchMode` records every op that makes the host wait for the device: reading a scalar
(``.item()``, ``bool()``, ``int()``, ``float()`` of a tensor: ``aten._local_scalar_dense``), ops
whose output shape depends on the data (``nonzero`` and friends) and device-to-host copies. On the
CPU a ``.cpu()`` of a CPU tensor dispatches nothing, so copies only show on an accelerator; scalar
reads and data-dependent shapes show everywhere. Steps where Lightning writes its logs
(``log_every_n_steps``) may read values and are counted apart.
"""
import os
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils._python_dispatch import TorchDispatchMode

from lpt_lightning.callbacks import default_callbacks
from lpt_lightning.data_facts import connect
from lpt_lightning.phases.moe_scorer import scorer_fit_data
from lpt_lightning.models.expert import ExpertSpec, GroupPromptSpec
from lpt_lightning.phases import AdaptPhase, GroupPromptPhase, MoEScorerPhase, OptimSpec
from tiny_models import tiny_backbone, tiny_datamodule, tiny_image_folder

aten = torch.ops.aten
# Ops that cannot finish without the host seeing device data.
SYNC_OPS = {aten._local_scalar_dense, aten.item, aten.nonzero, aten.nonzero_static, aten.masked_select,
            aten.unique_consecutive, aten._unique2, aten.unique_dim, aten.repeat_interleave, aten.equal,
            aten.is_nonzero}
LOG_EVERY = 4


class SyncRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func.overloadpacket in SYNC_OPS or _device_to_host(func, args, kwargs)) and not _optimiser_step_count():
            self.ops.append(str(func))
        return func(*args, **kwargs)


def _device_to_host(func, args, kwargs) -> bool:
    if func.overloadpacket not in (aten._to_copy, aten.copy_):
        return False
    source = args[1] if func.overloadpacket is aten.copy_ else args[0]
    target = args[0].device if func.overloadpacket is aten.copy_ else kwargs.get("device", source.device)
    return source.device.type != "cpu" and torch.device(target).type == "cpu"


def _optimiser_step_count() -> bool:
    """Adam's step counter is a CPU tensor on every device (unless ``capturable``): its ``.item()``
    in torch.optim waits for nothing. Only on this CPU does it look like the others."""
    frame = sys._getframe(2)
    while frame is not None:
        if f"torch{os.sep}optim{os.sep}" in frame.f_code.co_filename:
            return frame.f_code.co_name in ("_get_value", "_single_tensor_adam", "_multi_tensor_adam")
        frame = frame.f_back
    return False


class CountSyncs(L.Callback):
    """The host syncs of each training step (from its batch start to the next one, or to the
    epoch's validation or end: the optimiser, the scheduler, every callback and Lightning's
    bookkeeping included) and of each evaluation batch."""

    def __init__(self):
        # (steady, logging step, ops): a step is steady unless it starts or ends an epoch or the run.
        self.steps: dict[str, list[tuple[bool, bool, list[str]]]] = {"train": [], "validation": [], "test": []}
        self._mode: SyncRecorder | None = None

    def _start(self, stage: str, steady: bool, logging_step: bool) -> None:
        self._stop()
        self._mode = SyncRecorder().__enter__()
        self.steps[stage].append((steady, logging_step, self._mode.ops))

    def _stop(self, *_) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        steady = 0 < batch_idx < trainer.num_training_batches - 1 and trainer.global_step > 0
        if trainer.max_steps > 0:
            steady &= trainer.global_step < trainer.max_steps - 1
        self._start("train", steady, trainer._logger_connector.should_update_logs)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._start("validation", True, False)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._start("test", True, False)

    on_train_epoch_end = on_validation_start = on_validation_batch_end = on_test_batch_end = _stop

    def steady(self, stage: str, logging: bool = False) -> list[list[str]]:
        return [ops for steady, logs, ops in self.steps[stage] if steady and logs == logging]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tiny_image_folder(tmp_path_factory.mktemp("data") / "imgs")


def images(folder):
    return tiny_datamodule(folder, eval_batch_size=3, num_workers=1)


def trainer(root, counter, **kw):
    return L.Trainer(accelerator="cpu", devices=1, precision="32-true", logger=CSVLogger(root),
                     log_every_n_steps=LOG_EVERY, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(root),
                     callbacks=[counter, *default_callbacks()], **kw)


def assert_no_syncs(counter: CountSyncs, stage: str, at_least: int) -> None:
    steady = counter.steady(stage)
    assert len(steady) >= at_least, (stage, len(steady))
    assert [ops for ops in steady if ops] == [], f"{stage}: host syncs in steady-state steps"


def test_no_host_sync_in_steady_state_steps_of_every_phase(folder, tmp_path):
    L.seed_everything(0)
    checkpoints, report = {}, {}
    for kind in ("visual", "vl"):
        data = images(folder)
        phase1 = AdaptPhase(expert=ExpertSpec(kind=kind, backbone=tiny_backbone(kind), prompt_length=2),
                            num_classes=data.num_classes, class_names=data.class_names,
                            optim=OptimSpec(warmup_epochs=0))
        connect(phase1, data)
        counter = CountSyncs()
        t = trainer(tmp_path / f"p1{kind}", counter, max_epochs=1)
        t.fit(phase1, datamodule=data)
        assert_no_syncs(counter, "train", 8)
        assert_no_syncs(counter, "validation", 3)
        report[f"phase 1 {kind}"] = counter
        checkpoints[kind] = tmp_path / f"{kind}1.ckpt"
        t.save_checkpoint(checkpoints[kind])

    data = images(folder)
    phase2 = GroupPromptPhase(phase1_checkpoint=str(checkpoints["visual"]), num_classes=data.num_classes,
                              group_prompts=GroupPromptSpec(pool_size=4, top_k=2, start_block=2, length=2),
                              optim=OptimSpec(warmup_epochs=0))
    connect(phase2, data)
    counter = CountSyncs()
    trainer(tmp_path / "p2", counter, max_epochs=1).fit(phase2, datamodule=data)
    assert_no_syncs(counter, "train", 8)
    assert_no_syncs(counter, "validation", 3)
    report["phase 2"] = counter

    data = images(folder)
    # Fitted on the training split's outputs: more steps per epoch than the 12 held-out rows give.
    phase3 = MoEScorerPhase(visual_checkpoint=str(checkpoints["visual"]), vl_checkpoint=str(checkpoints["vl"]),
                            num_classes=4, scorer={"hidden_dim": 8, "fit_on": "train"})
    counter = CountSyncs()
    t = trainer(tmp_path / "p3", counter, max_epochs=1)
    t.fit(phase3, datamodule=scorer_fit_data(phase3, data, t))
    assert_no_syncs(counter, "train", 8)
    t.test(phase3, datamodule=data, verbose=False)  # both experts and the scorer on images
    assert_no_syncs(counter, "test", 3)
    # Logging steps read: Lightning each logged value for the logger, the non-finite check its flag.
    report["phase 3"] = counter
    for name, c in report.items():
        logging_steps = c.steady("train", logging=True)
        assert logging_steps and all(ops.count("aten._local_scalar_dense.default") >= 1 for ops in logging_steps), name
        print(f"{name}: syncs per logging step {[len(ops) for ops in logging_steps]}")
