"""Settings for runs on GPUs (issue 22, item 5): TF32 matmuls on CUDA, DDP without the per-step
buffer broadcast, hub downloads one process at a time."""
from __future__ import annotations

import fcntl
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.strategies import DDPStrategy

from lpt_lightning.lightning_cli import tune_for_hardware
from lpt_lightning.models.backbones import BackboneSpec, build_backbone
from tiny_models import TIMM_TINY


@pytest.fixture
def matmul_precision():
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def test_tf32_matmuls_on_cuda_only(matmul_precision):
    tune_for_hardware(L.Trainer(accelerator="cpu", devices=1, logger=False))
    assert torch.get_float32_matmul_precision() == "highest"
    tune_for_hardware(SimpleNamespace(accelerator=CUDAAccelerator(), strategy=None))
    assert torch.get_float32_matmul_precision() == "high"
    torch.set_float32_matmul_precision("medium")  # a choice of the user's stays
    tune_for_hardware(SimpleNamespace(accelerator=CUDAAccelerator(), strategy=None))
    assert torch.get_float32_matmul_precision() == "medium"


def test_ddp_does_not_broadcast_buffers_unless_asked():
    trainer = tune_for_hardware(L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False))
    assert isinstance(trainer.strategy, DDPStrategy)
    assert trainer.strategy._ddp_kwargs["broadcast_buffers"] is False  # what DistributedDataParallel gets
    asked = tune_for_hardware(L.Trainer(accelerator="cpu", devices=2, logger=False,
                                        strategy=DDPStrategy(broadcast_buffers=True)))
    assert asked.strategy._ddp_kwargs["broadcast_buffers"] is True


def lock_is_held(folder) -> bool:
    with open(folder / "hub-download.lock", "a") as other:
        try:
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(other, fcntl.LOCK_UN)
        return False


def test_hub_downloads_hold_the_node_lock(tmp_path, monkeypatch):
    """A hub build runs under the lock every other process on the node waits on; a local file does not."""
    import open_clip
    import timm
    from safetensors.torch import save_file

    monkeypatch.setenv("LPT_CACHE_DIR", str(tmp_path))
    held = []
    create, create_clip = timm.create_model, open_clip.create_model

    def offline_create(name, pretrained=False, **kwargs):
        held.append((bool(pretrained), lock_is_held(tmp_path)))
        return create(name, pretrained=False, **kwargs)  # random weights instead of the download

    def offline_create_clip(name, pretrained=None, **kwargs):
        held.append(("clip", lock_is_held(tmp_path)))
        return create_clip(name, pretrained=None, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline_create)
    monkeypatch.setattr(open_clip, "create_model", offline_create_clip)
    hub = build_backbone("visual", BackboneSpec(name="vit_base_patch16_224", pretrained=True,
                                                model_kwargs=dict(TIMM_TINY)))
    assert held == [(True, True)]
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in hub.model.state_dict().items()}, str(path))
    build_backbone("visual", BackboneSpec(name="vit_base_patch16_224", checkpoint_path=str(path),
                                          model_kwargs=dict(TIMM_TINY)))
    assert held[-1] == (False, False)
    build_backbone("vl", BackboneSpec(name="ViT-B-16", pretrained="openai"))
    assert held[-1] == ("clip", True)
    assert not lock_is_held(tmp_path)  # released after each build
