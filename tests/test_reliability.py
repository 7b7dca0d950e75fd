"""Faults: NaN losses, SIGKILL, a dying rank, full disks, unwritable directories, torn writes."""
import copy
import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from lpt_lightning.callbacks import NonFiniteLossPolicy, StepSeeding, batch_sources
from lpt_lightning.checkpoints import AtomicCheckpointIO, load_checkpoint_file
from lpt_lightning.data import FashionMNISTSource, LongTailDataModule
from lpt_lightning.data_facts import connect
from lpt_lightning.errors import CheckpointError, ConfigError
from lpt_lightning.expert_outputs import ensure_disk_space
from lpt_lightning.models.expert import ExpertSpec
from lpt_lightning.phases import AdaptPhase, OptimSpec
from lpt_lightning.pipeline import run_pipeline
from test_pipeline import TINY
from tiny_models import tiny_backbone
from datasets_available import needs_fmnist

REPO = Path(__file__).resolve().parents[1]
LPT = str(Path(sys.executable).with_name("lpt"))


class NaNAt(AdaptPhase):
    """Phase 1 whose loss turns NaN at the given global steps (a corrupt image, an overflow)."""

    nan_steps: tuple = ()

    def stream_loss(self, stream, out, labels):
        terms = super().stream_loss(stream, out, labels)
        if self.global_step in self.nan_steps:
            terms["cls"] = terms["cls"] * float("nan")
        return terms


def nan_phase(steps):
    L.seed_everything(0)
    phase = NaNAt(expert=ExpertSpec(kind="visual", backbone=tiny_backbone("visual"), prompt_length=2),
                  num_classes=10, optim=OptimSpec(base_lr=0.5, warmup_epochs=0))
    phase.nan_steps = steps
    return phase


def fit(phase, root, callbacks=(), epochs=1, policy=None):
    dm = LongTailDataModule(FashionMNISTSource(imbalance_ratio=10, max_per_class=40, val_per_class=5,
                                               max_test_per_class=5), batch_size=16, num_workers=0)
    connect(phase, dm)
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False,
                        default_root_dir=root, callbacks=[*callbacks, policy or NonFiniteLossPolicy(), StepSeeding()],
                        enable_checkpointing=bool(callbacks), plugins=[AtomicCheckpointIO()])
    trainer.fit(phase, datamodule=dm)
    return trainer


@needs_fmnist
def test_nan_loss_stops_naming_step_and_images_and_keeps_the_last_checkpoint(tmp_path):
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    with pytest.raises(FloatingPointError) as exc:
        fit(nan_phase((5,)), tmp_path, [checkpoints])
    message = str(exc.value)
    assert "at global step 5 (epoch 0, batch 5)" in message and "train item" in message
    assert "on_nonfinite=skip" in message
    saved = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert [p.name for p in saved] == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"]
    state = load_checkpoint_file(saved[-1])["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


@needs_fmnist
def test_isolated_nan_batches_can_be_skipped_and_counted(tmp_path):
    phase = nan_phase((2, 4))
    policy = NonFiniteLossPolicy(on_nonfinite="skip", max_nonfinite_batches=3)
    trainer = fit(phase, tmp_path, policy=policy)
    assert policy.skipped_batches == 2
    assert trainer.global_step == trainer.num_training_batches  # the epoch went on past both
    assert all(torch.isfinite(p).all() for p in phase.parameters())
    with pytest.raises(FloatingPointError, match="global step 3"):
        fit(nan_phase((1, 2, 3)), tmp_path, policy=NonFiniteLossPolicy(on_nonfinite="skip", max_nonfinite_batches=2))


def test_a_skipped_micro_batch_leaves_the_gradients_of_its_window_as_they_were():
    policy = NonFiniteLossPolicy(on_nonfinite="skip")
    module = L.LightningModule()
    module.weight = torch.nn.Parameter(torch.ones(3))
    trainer = SimpleNamespace(world_size=1, global_step=7, current_epoch=0)
    policy.on_train_batch_start(trainer, module, {"ib": {"index": torch.arange(2)}}, 3)
    (2 * module.weight).sum().backward()  # the first micro-batch of an accumulation window
    bad = (module.weight * float("nan")).sum()
    policy.on_before_backward(trainer, module, bad)
    bad.backward()
    assert torch.isnan(module.weight.grad).all()
    policy.on_after_backward(trainer, module)
    assert module.weight.grad.tolist() == [2.0, 2.0, 2.0] and policy.skipped_batches == 1
    assert policy.state_dict() == {"skipped_batches": 1}  # checkpointed: a resumed run keeps counting


def test_atomic_checkpoint_write_never_leaves_a_torn_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()

    def torn_write(checkpoint, filepath):  # the disk fills up half-way through the write
        Path(filepath).write_bytes(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr("lightning.fabric.plugins.io.torch_io._atomic_save", torn_write)
    with pytest.raises(OSError, match="No space"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.fixture
def tmpdir_on_another_filesystem(tmp_path, monkeypatch):
    """$TMPDIR on a tmpfs (/dev/shm), as on nodes whose /tmp is memory or node-local disk."""
    shm = Path("/dev/shm")
    if sys.platform != "linux" or not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test's tmp_path (Linux)")
    directory = tempfile.mkdtemp(dir=shm)
    monkeypatch.setattr(tempfile, "tempdir", directory)
    yield Path(directory)
    shutil.rmtree(directory)


def test_lightning_own_atomic_save_tears_the_checkpoint_when_tmpdir_is_another_filesystem(
        tmp_path, monkeypatch, tmpdir_on_another_filesystem):
    """Why AtomicCheckpointIO is kept: Lightning's save writes its temporary file in $TMPDIR and
    shutil.move()s it into place, which across filesystems copies over the checkpoint, so the disk
    filling up mid-copy leaves half a last.ckpt. Ours renames within the checkpoint's folder."""
    old, new = {"state_dict": {"w": torch.ones(50_000)}}, {"state_dict": {"w": torch.zeros(50_000)}}
    ios = {"lightning": TorchCheckpointIO(), "ours": AtomicCheckpointIO()}
    paths = {name: tmp_path / name / "last.ckpt" for name in ios}
    for name, io in ios.items():
        io.save_checkpoint(old, paths[name])
    before = paths["ours"].read_bytes()
    assert paths["lightning"].read_bytes() == before
    sendfile = os.sendfile

    def disk_fills_up(out_fd, in_fd, offset, count):  # the copy stops half-way through the file
        if offset:
            raise OSError(errno.ENOSPC, "No space left on device")
        return sendfile(out_fd, in_fd, offset, os.fstat(in_fd).st_size // 2)

    monkeypatch.setattr(os, "sendfile", disk_fills_up)
    for name, io in ios.items():
        with pytest.raises(OSError, match="No space"):
            io.save_checkpoint(new, paths[name])
    assert 0 < paths["lightning"].stat().st_size < len(before)
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint_file(paths["lightning"])
    assert paths["ours"].read_bytes() == before and [p.name for p in paths["ours"].parent.iterdir()] == ["last.ckpt"]


def test_too_little_disk_for_the_cache_is_refused_up_front(tmp_path):
    with pytest.raises(ConfigError, match=r"needs about 1000000.00 GB in .*cache_dir"):
        ensure_disk_space(tmp_path / "cache", int(1e15))
    ensure_disk_space(tmp_path / "cache", 1000)


def test_unwritable_run_directory_is_refused_before_anything_runs(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot be created"):
        run_pipeline(run_dir=str(blocker / "run"), data=TINY["data"])
    from lpt_lightning.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(REPO / "configs/cpu/fmnist_lt_phase1.yaml"),
              f"--trainer.default_root_dir={blocker / 'run'}"])
    assert exc.value.code == 2 and "not writable" in capsys.readouterr().err


def env():
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled",
                PYTHONPATH=str(Path(__file__).parent))


@needs_fmnist
@pytest.mark.ddp
def test_a_dying_rank_ends_the_whole_job_quickly(tmp_path):
    start = time.monotonic()
    result = subprocess.run(
        [LPT, "fit", "--config", str(REPO / "configs/cpu/fmnist_lt_phase1.yaml"), "--trainer.devices=2",
         "--trainer.strategy=ddp", "--data.batch_size=16",
         "--trainer.callbacks+=pipeline_helpers.DieOnRank", "--trainer.callbacks.rank=1",
         "--trainer.callbacks.step=3"],
        cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert "remote worker" in result.stderr  # gloo names the cause: the peer rank went away
    assert elapsed < 240, elapsed


@needs_fmnist
@pytest.mark.slow
def test_pipeline_killed_with_sigkill_resumes_to_the_same_result(tmp_path):
    config = copy.deepcopy(TINY)
    config.update(experts=["visual"], mixture=False, test=False, checkpoint_every_n_steps=2)
    config["phase1"]["trainer"]["max_epochs"] = 3
    config["phase2"]["trainer"]["max_epochs"] = 1

    def write(name):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(dict(config, run_dir=str(tmp_path / name))))
        return path

    subprocess.run([LPT, "pipeline", "--config", str(write("reference"))], env=env(), check=True,
                   capture_output=True, timeout=600)
    killed = write("killed")
    process = subprocess.Popen([LPT, "pipeline", "--config", str(killed)], env=env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "killed" / "phase1_visual" / "checkpoints"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(checkpoints.glob("epoch=1-*.ckpt")):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # mid-way through epoch 1, no clean-up at all
    process.wait()
    assert not (tmp_path / "killed" / "phase1_visual" / "final.ckpt").exists()
    subprocess.run([LPT, "pipeline", "--config", str(killed)], env=env(), check=True, capture_output=True,
                   timeout=600)
    for phase in ("phase1_visual", "phase2_visual"):
        a = load_checkpoint_file(tmp_path / "reference" / phase / "final.ckpt")["state_dict"]
        b = load_checkpoint_file(tmp_path / "killed" / phase / "final.ckpt")["state_dict"]
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (phase, key)


def test_a_bad_batch_is_named_by_its_images_where_the_data_has_names():
    batch = {"cb": {"index": torch.tensor([2, 0])}, "ib": {"index": torch.tensor([1])}}
    images = SimpleNamespace(training_items=["a.jpg", "b.jpg", "c.jpg"])
    assert batch_sources(SimpleNamespace(datamodule=images), batch) == "c.jpg, a.jpg, b.jpg"
    # Cached expert outputs (phase 3) have no image names: the rows are named by index.
    cached = SimpleNamespace(splits={"val": None}, fit_split="val")
    assert batch_sources(SimpleNamespace(datamodule=cached), batch, show=2) == "train item 2, train item 0 and 1 more"
