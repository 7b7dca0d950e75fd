"""Evaluation protocol: the test split is never used for selection or fitting, a held-out split is
carved out of train before phase 1, and every phase checks it trains on the same data."""
import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from PIL import Image

from lpt_lightning.checkpoints import load_checkpoint_file
from lpt_lightning.data import ImageFolderSource, LongTailDataModule
from lpt_lightning.data.long_tail import holdout_upto
from lpt_lightning.data_facts import connect
from lpt_lightning.errors import CheckpointError, ConfigError
from lpt_lightning.phases.moe_scorer import scorer_fit_data
from lpt_lightning.metrics import shot_groups
from lpt_lightning.models.expert import ExpertSpec, GroupPromptSpec
from lpt_lightning.phases import AdaptPhase, GroupPromptPhase, MoEScorerPhase, OptimSpec
from lpt_lightning.phases.moe_scorer import ScorerSpec
from tiny_models import tiny_backbone

COUNTS = [16, 11, 6, 4]  # per class, before the balanced test slice (1 per class) is carved


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "imgs"
    rng = np.random.default_rng(0)
    for c, n in enumerate(COUNTS):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(n + 1):
            pixels = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


def dm(folder, **kw) -> LongTailDataModule:
    """A dataset with a test split and no validation split (like iNaturalist 2018)."""
    source = ImageFolderSource(root=str(folder), test_per_class=1, seed=0, name="no_val")
    return LongTailDataModule(source, **{"batch_size": 4, "num_workers": 0, "img_size": 32, "pin_memory": False,
                                         "sampling": "instance", **kw})


def fake_trainer(callbacks=()):
    return SimpleNamespace(world_size=1, global_rank=0, callbacks=list(callbacks))


# ----------------------------------------------------------------------------- the held-out carving


def test_holdout_takes_up_to_k_and_at_most_a_fraction_of_each_class():
    labels = np.repeat(np.arange(5), [100, 12, 6, 4, 1])
    held, rest = holdout_upto(labels, per_class=5, seed=3, max_fraction=0.2)
    assert np.bincount(labels[held], minlength=5).tolist() == [5, 2, 1, 0, 0]
    assert np.intersect1d(held, rest).size == 0 and np.union1d(held, rest).tolist() == list(range(labels.size))
    again, _ = holdout_upto(labels, per_class=5, seed=3, max_fraction=0.2)
    other, _ = holdout_upto(labels, per_class=5, seed=4, max_fraction=0.2)
    assert held.tolist() == again.tolist() and held.tolist() != other.tolist()
    with pytest.raises(ConfigError, match="holdout_max_fraction"):
        holdout_upto(labels, per_class=5, seed=0, max_fraction=1.0)


def test_places_lt_groups_follow_the_lpt_convention():
    """131 / 157 / 77 classes on the real Places-LT training counts (6 classes have exactly 20)."""
    counts = json.loads((Path(__file__).parent / "fixtures" / "places_lt_counts.json").read_text())["train"]
    assert len(counts) == 365 and sum(counts) == 62_500 and counts.count(20) == 6
    sizes = {k: int(v.sum()) for k, v in shot_groups(counts, "lpt").items()}
    assert sizes == {"many": 131, "medium": 157, "few": 77}
    assert int(shot_groups(counts, "oltr")["few"].sum()) == 71  # OLTR: the 20-image classes are medium


def test_no_validation_split_is_an_error_not_the_test_split(folder):
    data = dm(folder)
    data.trainer = fake_trainer()
    with pytest.raises(ConfigError, match=r"no validation split.*holdout_per_class.*val_from_test"):
        data.setup("fit")
    data.setup("test")  # testing needs no validation split
    assert len(data.test_dataloader().dataset) == len(COUNTS)


def test_val_from_test_is_for_monitoring_only(folder):
    data = dm(folder, val_from_test=True)
    data.trainer = fake_trainer([ModelCheckpoint(save_last=True)])  # no monitor: keeps the last epoch
    with pytest.warns(UserWarning, match="TEST accuracy"):
        data.setup("fit")
    assert data.val_is_test and data.val_dataloader().dataset.split is data.splits.test
    assert data.data_record()["val_is_test"] and data.data_record()["val"] is None
    for callback in (ModelCheckpoint(monitor="val/acc", mode="max"), EarlyStopping(monitor="val/acc_few")):
        selecting = dm(folder, val_from_test=True)
        selecting.trainer = fake_trainer([callback])
        with pytest.raises(ConfigError, match=rf"{type(callback).__name__}\(monitor='val/acc.*'\).*test split"):
            selecting.setup("fit")


def test_holdout_is_carved_before_training_identically_everywhere(folder):
    data = dm(folder, holdout_per_class=2)
    train, val = data.splits.train, data.splits.val
    assert np.bincount(val.labels, minlength=4).tolist() == [2, 2, 1, 0]  # at most 20%: 16 -> 2 (cap), 11 -> 2, 6 -> 1, 4 -> 0
    assert not set(train.items) & set(val.items) and not set(val.items) & set(data.splits.test.items)
    assert data.group_class_counts.tolist() == COUNTS  # groups keep the dataset's own counts
    assert data.train_class_counts.tolist() == [14, 9, 5, 4]  # the losses see what really trains
    other_rank = dm(folder, holdout_per_class=2)
    assert other_rank.data_record() == data.data_record()
    assert data.data_record()["holdout"] == {"per_class": 2, "max_fraction": 0.2, "seed": 0, "size": 5}
    assert dm(folder, holdout_per_class=2, holdout_seed=1).data_record()["val"] != data.data_record()["val"]
    assert "held-out split carved from train" in data.summary()


def test_holdout_and_opt_in_are_refused_where_a_validation_split_exists(folder):
    source = ImageFolderSource(root=str(folder), val_per_class=1, seed=0)
    for option in ({"holdout_per_class": 2}, {"val_from_test": True}):
        with pytest.raises(ConfigError, match=f"has a validation split.*{next(iter(option))}"):
            LongTailDataModule(source, img_size=32, **option).splits


# ----------------------------------------------------------------------------- phases check their data


# One-epoch runs: a warm-up epoch would be the whole run (refused), so none.
ONE_EPOCH = OptimSpec(warmup_epochs=0)


def fit(module, data, root, epochs=1):
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, precision="32-true", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, default_root_dir=str(root))
    connect(module, data)
    trainer.fit(module, datamodule=data)
    return trainer


@pytest.fixture(scope="module")
def experts(folder, tmp_path_factory):
    """Phase-1 checkpoints of both experts trained with a held-out split (seed 0)."""
    root = tmp_path_factory.mktemp("experts")
    paths = {}
    for kind in ("visual", "vl"):
        data = dm(folder, holdout_per_class=2)
        spec = ExpertSpec(kind=kind, backbone=tiny_backbone(kind), prompt_length=2)
        module = AdaptPhase(expert=spec, num_classes=data.num_classes, class_names=data.class_names,
                            optim=ONE_EPOCH)
        trainer = fit(module, data, root / kind)
        paths[kind] = root / f"{kind}.ckpt"
        trainer.save_checkpoint(paths[kind])
    return paths


def test_checkpoints_record_their_data(experts, folder):
    meta = load_checkpoint_file(experts["visual"])["lpt"]
    assert meta["data"] == dm(folder, holdout_per_class=2).data_record()


def test_phase2_refuses_a_phase1_trained_with_another_holdout(experts, folder, tmp_path):
    group = GroupPromptSpec(pool_size=4, top_k=2, start_block=2, length=2)
    other = dm(folder, holdout_per_class=2, holdout_seed=1)
    phase2 = GroupPromptPhase(phase1_checkpoint=str(experts["visual"]), group_prompts=group, num_classes=4,
                              optim=ONE_EPOCH)
    with pytest.raises(CheckpointError, match=r"phase1_checkpoint=.*another training split"):
        fit(phase2, other, tmp_path)
    phase2 = GroupPromptPhase(phase1_checkpoint=str(experts["visual"]), group_prompts=group, num_classes=4,
                              optim=ONE_EPOCH)
    fit(phase2, dm(folder, holdout_per_class=2), tmp_path)  # the same data: accepted


def fit_scorer(module, data, root, epochs=1):
    """``lpt fit`` of phase 3: the experts' outputs, then the scorer on them."""
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, precision="32-true", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, default_root_dir=str(root))
    cached = scorer_fit_data(module, data, trainer)
    trainer.fit(module, datamodule=cached)
    return cached


def scorer(experts, tmp_path, **spec):
    return MoEScorerPhase(visual_checkpoint=str(experts["visual"]), vl_checkpoint=str(experts["vl"]), num_classes=4,
                          scorer=ScorerSpec(hidden_dim=8, **spec), cache_dir=str(tmp_path / "cache"))


def test_phase3_refuses_test_as_validation_and_foreign_experts(experts, folder, tmp_path):
    with pytest.raises(ConfigError, match=r"TEST split here \(data.val_from_test=true\)"):
        fit_scorer(scorer(experts, tmp_path), dm(folder, val_from_test=True, sampling="class_aware"), tmp_path)
    with pytest.raises(CheckpointError, match=r"visual_checkpoint=.*another training split"):
        fit_scorer(scorer(experts, tmp_path), dm(folder, holdout_per_class=2, holdout_seed=7, sampling="class_aware"),
                   tmp_path)
    unrecorded = tmp_path / "old.ckpt"
    checkpoint = load_checkpoint_file(experts["vl"])
    del checkpoint["lpt"]["data"]
    torch.save(checkpoint, unrecorded)
    module = MoEScorerPhase(visual_checkpoint=str(experts["visual"]), vl_checkpoint=str(unrecorded), num_classes=4)
    with pytest.raises(CheckpointError, match=r"vl_checkpoint=.*old\.ckpt: the checkpoint records no training data"):
        fit_scorer(module, dm(folder, holdout_per_class=2, sampling="class_aware"), tmp_path)


def test_phase3_fits_on_the_held_out_split_by_default(experts, folder, tmp_path):
    data = dm(folder, holdout_per_class=2, sampling="class_aware")
    module = scorer(experts, tmp_path)
    seen = []
    module.on_train_batch_start = lambda batch, batch_idx: seen.append(batch["cb"]["index"].clone())
    cached = fit_scorer(module, data, tmp_path, epochs=2)
    assert cached.fit_split == "val"
    caches = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir())
    assert caches == ["val"]  # no inference over the training images at all
    assert torch.cat(seen).max() < len(data.splits.val)  # batches index the held-out split
    saved = tmp_path / "p3.ckpt"
    module.trainer.save_checkpoint(saved)
    meta = load_checkpoint_file(saved)["lpt"]
    assert meta["scorer_fit_on"] == "heldout" and meta["data"] == data.data_record()

    ablation = dm(folder, holdout_per_class=2, sampling="class_aware")
    assert fit_scorer(scorer(experts, tmp_path, fit_on="train"), ablation, tmp_path).fit_split == "train"
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir()) == ["train", "val"]
