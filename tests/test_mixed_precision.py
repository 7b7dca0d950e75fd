"""bf16-mixed end to end on the CPU (CPU autocast runs bfloat16): every phase, the pipeline, test,
predict and export, against the float32 run on the same seed; float32 where it decides a label or
a gradient's size. 16-mixed is refused up front (lpt_lightning/precision.py says why)."""
import copy
import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import lpt_lightning.phases.base as phase_base
from lpt_lightning.callbacks import default_callbacks
from lpt_lightning.checkpoints import load_checkpoint_file
from lpt_lightning.cli import main
from lpt_lightning.data import FashionMNISTSource
from lpt_lightning.data_facts import connect
from lpt_lightning.errors import ConfigError
from lpt_lightning.lightning_cli import parse_config
from lpt_lightning.metrics import SPLIT_KEYS, SplitAccuracy
from lpt_lightning.models.expert import ExpertSpec, GroupPromptSpec, LongTailExpert
from lpt_lightning.models.scorer import BaseWeightSearch, MoEScorer
from lpt_lightning.phases import AdaptPhase, GroupPromptPhase, OptimSpec
from lpt_lightning.precision import check_precision
from datasets_available import needs_fmnist
from test_pipeline import TINY
from tiny_models import tiny_backbone, tiny_datamodule, tiny_image_folder

REPO = Path(__file__).resolve().parents[1]
GROUP = GroupPromptSpec(pool_size=4, top_k=2, start_block=2, length=2)
BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tiny_image_folder(tmp_path_factory.mktemp("data") / "imgs")


def images(folder):
    return tiny_datamodule(folder, eval_batch_size=6, num_workers=0)


class Record(L.Callback):
    """Each step's loss and the dtypes of the head's logits and of every loss term."""

    def __init__(self):
        self.losses: list[float] = []
        self.dtypes: dict[str, set[torch.dtype]] = {"block": set(), "logits": set(), "stream loss": set(), "loss": set()}

    def on_fit_start(self, trainer, pl_module):
        mlp = pl_module.expert.backbone.blocks[0].mlp  # what autocast computes in bf16
        mlp.register_forward_hook(lambda m, i, out: self.dtypes["block"].add(out.dtype))
        pl_module.expert.head.register_forward_hook(lambda m, i, out: self.dtypes["logits"].add(out.dtype))
        for loss in pl_module.stream_losses.values():
            loss.register_forward_hook(lambda m, i, out: self.dtypes["stream loss"].add(out.dtype))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.dtypes["loss"].add(outputs["loss"].dtype)
        self.losses.append(float(outputs["loss"]))


def fit(module, folder, root, precision):
    L.seed_everything(0)
    data = images(folder)
    connect(module, data)
    record = Record()
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, default_root_dir=str(root), callbacks=[record, *default_callbacks()])
    trainer.fit(module, datamodule=data)
    return trainer, record


def test_fp32_where_it_decides_under_bf16_autocast():
    torch.manual_seed(0)
    images_ = torch.rand(6, 3, 32, 32)
    for kind in ("visual", "vl"):
        expert = LongTailExpert(ExpertSpec(kind=kind, backbone=tiny_backbone(kind), prompt_length=2), 4,
                                group=GROUP).eval()
        with torch.autocast(**BF16):
            out = expert(images_)
            match = phase_base.matching_loss(out.query, expert.group_prompts.keys, out.match.indices)
        assert out.logits.dtype == torch.float32 and match.dtype == torch.float32, kind
        reference = expert(images_).logits
        torch.testing.assert_close(out.logits, reference, rtol=0, atol=0.01)  # measured gap 0.0014
    scorer = MoEScorer(8, 6, hidden_dim=4)
    with torch.autocast(**BF16):
        w = scorer(torch.randn(5, 8, dtype=torch.bfloat16), torch.randn(5, 6, dtype=torch.bfloat16))
    assert w.dtype == torch.float32
    metric = SplitAccuracy([30, 20, 12, 8])
    with torch.autocast(**BF16):
        metric.update(torch.randn(5, 4, dtype=torch.bfloat16), torch.tensor([0, 1, 2, 3, 0]))
    assert metric.correct.dtype == metric.total.dtype == torch.long and float(metric.compute()["acc"]) >= 0
    assert BaseWeightSearch(4).correct.dtype == torch.float64


@pytest.mark.parametrize("kind", ["visual", "vl"])
def test_phases_1_and_2_in_bf16_follow_the_fp32_run(folder, tmp_path, kind, monkeypatch):
    match_dtypes = set()

    def recorded_matching_loss(*args):
        loss = matching_loss(*args)
        match_dtypes.add(loss.dtype)
        return loss

    matching_loss = phase_base.matching_loss
    monkeypatch.setattr(phase_base, "matching_loss", recorded_matching_loss)
    runs = {}
    for precision in ("32-true", "bf16-mixed"):
        L.seed_everything(0)
        phase1 = AdaptPhase(expert=ExpertSpec(kind=kind, backbone=tiny_backbone(kind), prompt_length=2),
                            num_classes=4, class_names=[f"class{c}" for c in range(4)], optim=OptimSpec(warmup_epochs=0))
        t1, r1 = fit(phase1, folder, tmp_path / precision, precision)
        ckpt = tmp_path / f"phase1-{precision}.ckpt"
        t1.save_checkpoint(ckpt)
        # Phase 2 of both precisions starts from the fp32 phase 1, so only phase 2's precision differs.
        phase2 = GroupPromptPhase(phase1_checkpoint=str(tmp_path / "phase1-32-true.ckpt"), num_classes=4,
                                  group_prompts=GROUP, optim=OptimSpec(warmup_epochs=0))
        _, r2 = fit(phase2, folder, tmp_path / precision, precision)
        runs[precision] = (phase1, r1, phase2, r2)
        # The trained tensors stay float32 under either precision.
        assert {p.dtype for p in phase2.parameters() if p.requires_grad} == {torch.float32}
    for index in (1, 3):
        (fp32, bf16) = (runs[p][index] for p in ("32-true", "bf16-mixed"))
        assert len(bf16.losses) == len(fp32.losses) >= 10
        assert all(map(lambda v: torch.isfinite(torch.tensor(v)), bf16.losses))
        assert bf16.dtypes == {"block": {torch.bfloat16}, "logits": {torch.float32}, "stream loss": {torch.float32},
                               "loss": {torch.float32}}
        assert fp32.dtypes["block"] == {torch.float32}
        # Per step: the same batches and noise; bf16 rounds the backbone's activations only
        # (measured gap <= 0.017 on losses of about 1).
        torch.testing.assert_close(torch.tensor(bf16.losses), torch.tensor(fp32.losses), rtol=0.02, atol=0.02)
    assert match_dtypes == {torch.float32}
    for index in (0, 2):
        fp32, bf16 = (runs[p][index].results["val"] for p in ("32-true", "bf16-mixed"))
        assert abs(bf16["acc"] - fp32["acc"]) <= 100 / 12 + 1e-6  # 12 validation images: one may flip


def test_16_mixed_and_true_half_precisions_are_refused_up_front():
    assert check_precision("bf16") == "bf16-mixed" and check_precision(32) == "32-true"
    with pytest.raises(ConfigError, match=r"trainer.precision=16-mixed: float16 mixed precision is not supported.*"
                                          r"bf16-mixed.*32-true on older ones \(V100"):
        parse_config(["fit", "--config", str(REPO / "configs" / "cifar100_lt_phase1.yaml"),
                      "--trainer.precision", "16-mixed"])
    for value in ("16", "bf16-true", "16-true"):
        with pytest.raises(ConfigError, match=f"trainer.precision={value}"):
            check_precision(value)


@needs_fmnist
def test_pipeline_test_predict_and_export_in_bf16_follow_the_fp32_run(tmp_path):
    runs = {}
    for precision in ("32-true", "bf16-mixed"):
        config = copy.deepcopy(TINY)
        config["trainer"]["precision"] = precision
        for phase in ("phase1", "phase2", "phase3"):
            config[phase]["trainer"]["max_epochs"] = 1
        config["run_dir"] = str(tmp_path / precision)
        path = tmp_path / f"{precision}.yaml"
        path.write_text(yaml.safe_dump(config))
        main(["pipeline", "--config", str(path)])
        runs[precision] = tmp_path / precision
    fp32, bf16 = runs["32-true"], runs["bf16-mixed"]
    gaps = {}
    for phase in ("phase1_visual", "phase1_vl", "phase2_visual", "phase2_vl", "phase3_moe"):
        a, b = (json.loads((run / phase / "metrics.json").read_text())["results"] for run in (fp32, bf16))
        assert a.keys() == b.keys()
        pairs = [(a[row][k], b[row][k]) for row in a for k in SPLIT_KEYS]
        assert all((x is None) == (y is None) for x, y in pairs)  # None: a group without test images
        gaps[phase] = max(abs(x - y) for x, y in pairs if x is not None)
        state = load_checkpoint_file(bf16 / phase / "final.ckpt")["state_dict"]
        assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}, phase
    # Percent on 50 validation and 100 test images (10 per class, groups of 10 to 70): measured
    # gaps up to 3.3 points (one image of a 30-image group); 10 allows three such flips.
    assert max(gaps.values()) <= 10, gaps
    # The phase-3 cache stores what the experts computed in float32 as float16 (model.outputs_dtype),
    # under either precision.
    arrays = list((bf16 / "phase3_moe" / "expert_cache").rglob("*.npy"))
    assert arrays and {np.load(p, mmap_mode="r").dtype for p in arrays if p.stem.endswith((".logits", ".query"))} == {
        np.dtype("float16")}
    # predict and export from the bf16 run (its config.yaml keeps bf16-mixed).
    splits = FashionMNISTSource().load()
    folder = tmp_path / "images"
    folder.mkdir()
    for i in splits.test.items[:6]:
        Image.fromarray(splits.images[i]).save(folder / f"{i}.png")
    predictions = {}
    for name, run in (("fp32", fp32), ("bf16", bf16)):
        phase3 = run / "phase3_moe"
        out = tmp_path / f"{name}.json"
        main(["predict", "--config", str(phase3 / "config.yaml"), "--ckpt_path", str(phase3 / "final.ckpt"),
              "--data.predict_paths", str(folder), "--prediction.output", str(out)])
        predictions[name] = json.loads(out.read_text())
    assert len(predictions["bf16"]) == 6
    for a, b in zip(predictions["fp32"], predictions["bf16"]):
        assert a["image"] == b["image"] and 0 < sum(b["confidences"]) <= 1 + 1e-5  # top 5 of 10 classes
        fp32_confidence = dict(zip(a["classes"], a["confidences"]))
        # Two runs trained apart (bf16 rounds every step): measured gaps up to 0.02.
        assert all(abs(fp32_confidence[c] - p) < 0.1 for c, p in zip(b["classes"], b["confidences"])
                   if c in fp32_confidence)
    export = tmp_path / "lpt.safetensors"
    main(["export", str(bf16 / "phase3_moe" / "final.ckpt"), str(export)])
    assert {v.dtype for v in load_checkpoint_file(export)["state_dict"].values() if v.is_floating_point()} == {
        torch.float32}
