"""Randomness per draw: augmentation seeded by sampler draw, GCL noise and dropout per micro-batch."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from lpt_lightning.data import ImageFolderSource, LongTailDataModule
from lpt_lightning.data.samplers import Draw, InstanceSampler

COUNTS = {"a": 8, "b": 4, "c": 2, "d": 2}  # 16 train images: the class-aware stream redraws the tail


@pytest.fixture()
def folder(tmp_path) -> Path:
    """Noise images: every crop and flip of one gives a different tensor (a flat colour would not)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    for name, n in COUNTS.items():
        (root / name).mkdir(parents=True)
        for i in range(n + 1):  # +1 per class for a 1-per-class val slice
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def _dm(folder, **kw) -> LongTailDataModule:
    src = ImageFolderSource(root=str(folder), val_per_class=1, seed=0, name="tiny")
    args = dict(batch_size=4, num_workers=0, img_size=8, pin_memory=False)
    args.update(kw)
    dm = LongTailDataModule(source=src, **args)
    dm.setup("fit")
    return dm


def _epoch(dm, stream, epoch=0) -> list[dict]:
    """One stream's batches of an epoch of the training loader."""
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return [step[stream] for step in loader]


def _views(batches) -> dict[int, list[torch.Tensor]]:
    """Dataset index -> the augmented tensors of its draws, in draw order."""
    views = defaultdict(list)
    for batch in batches:
        for index, image in zip(batch["index"].tolist(), batch["image"]):
            views[index].append(image)
    return views


def test_repeated_draws_in_one_epoch_get_different_views(folder):
    dm = _dm(folder)
    cb, ib = _views(_epoch(dm, "cb")), _views(_epoch(dm, "ib"))
    repeated = {i: v for i, v in cb.items() if len(v) > 1}
    assert repeated  # tail images are drawn several times by the class-aware stream
    for views in repeated.values():
        for a in range(len(views)):
            for b in range(a):
                assert not torch.equal(views[a], views[b])
    assert sorted(ib) == list(range(16))  # an image drawn by both streams: different views too
    for index, views in cb.items():
        assert all(not torch.equal(view, ib[index][0]) for view in views)


def test_a_draw_is_reproducible_and_changes_with_the_epoch(folder):
    first, again = (_epoch(_dm(folder), "cb") for _ in range(2))
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, again))
    workers = _epoch(_dm(folder, num_workers=1), "cb")
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, workers))
    second_epoch = _epoch(_dm(folder), "cb", epoch=1)
    assert not torch.equal(torch.cat([b["image"] for b in first]), torch.cat([b["image"] for b in second_epoch]))


def test_a_restarted_epoch_repeats_the_views_of_its_remaining_draws(folder):
    dm = _dm(folder)
    full = _epoch(dm, "cb")
    loader = dm.train_dataloader()
    loader.load_state_dict(_state_after(dm, batches=2))  # what Lightning restores from a checkpoint
    resumed = [step["cb"] for step in loader]
    assert len(resumed) == 2
    for a, b in zip(full[2:], resumed):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["image"], b["image"])


def _state_after(dm, batches: int) -> dict:
    loader = dm.train_dataloader()
    steps = iter(loader)
    for _ in range(batches):
        next(steps)
    return loader.state_dict()


def test_views_do_not_depend_on_the_rank_count(folder):
    """2 ranks x batch 2 see the draws (and views) of 1 rank x batch 4, as DDP equivalence needs."""
    one = _epoch(_dm(folder), "cb")
    ranks = []
    for rank in range(2):
        dm = _dm(folder, batch_size=2)
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank, lightning_module=None)
        ranks.append(_epoch(dm, "cb"))
    for step, batch in enumerate(one):
        parts = [ranks[rank][step] for rank in range(2)]
        for slot in range(4):  # global position 4*step + slot is rank slot % 2's item slot // 2
            part = parts[slot % 2]
            assert part["index"][slot // 2] == batch["index"][slot]
            assert torch.equal(part["image"][slot // 2], batch["image"][slot])


def test_draw_seeds_follow_global_position():
    labels = np.zeros(6, dtype=np.int64)
    keys = list(InstanceSampler(labels, seed=1, draw_keys=True))
    assert all(isinstance(k, Draw) for k in keys) and len({k.seed for k in keys}) == 6
    shards = [list(InstanceSampler(labels, seed=1, num_replicas=2, rank=r, draw_keys=True)) for r in range(2)]
    assert [shards[i % 2][i // 2] for i in range(6)] == keys
    other_stream = list(InstanceSampler(labels, seed=2, draw_keys=True))
    assert not {k.seed for k in keys} & {k.seed for k in other_stream}
