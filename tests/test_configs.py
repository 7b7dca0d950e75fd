"""Every shipped config parses and validates with the real ``lpt`` parser (nothing is built),
and the benchmark configs carry the reference constants of SPEC.md."""
from __future__ import annotations

import functools
import io
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

from lpt_lightning.cli import main
from lpt_lightning.models.backbones import BackboneSpec
from lpt_lightning.models.expert import ExpertSpec, GroupPromptSpec

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
# Pipeline files (*_pipeline.yaml) compose phase configs: they are checked further down.
ALL_CONFIGS = sorted(p for p in CONFIG_DIR.rglob("*.yaml") if not p.name.endswith("_pipeline.yaml"))
DATASETS = ("places_lt", "imagenet_lt", "inat18", "cifar100_lt")
REFERENCE_BACKBONE = {"visual": "vit_base_patch16_224.augreg_in21k", "vl": "ViT-B-16"}


def config_id(path: Path) -> str:
    return str(path.relative_to(CONFIG_DIR))


def run_print_config(path: Path | str, *overrides: str) -> tuple[int, str, str]:
    """``lpt fit --config PATH ... --print_config``: the real parser validates, nothing is built."""
    out, err = io.StringIO(), io.StringIO()
    # sys.argv is pytest's: LightningCLI warns when it sees both args and a command line.
    with mock.patch.object(sys, "argv", ["lpt"]), redirect_stdout(out), redirect_stderr(err):
        try:
            main(["fit", "--config", str(path), *overrides, "--print_config"])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        else:
            code = 0
    return code, out.getvalue(), err.getvalue()


@functools.lru_cache(maxsize=None)
def parse_config(path: Path) -> dict:
    code, out, err = run_print_config(path)
    assert code == 0, f"{path} does not validate:\n{err[-3000:]}"
    return yaml.safe_load(out)


def parse_error(path: Path, *overrides: str) -> str:
    code, out, err = run_print_config(path, *overrides)
    assert code != 0, f"{path} {overrides} validated but should not"
    return out + err


def test_there_are_configs():
    names = {config_id(p) for p in ALL_CONFIGS}
    for dataset in DATASETS:
        for suffix in ("phase1", "phase2", "phase1_vl", "phase2_vl"):
            assert f"{dataset}_{suffix}.yaml" in names
    assert any(n.startswith("cpu/") for n in names)


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=config_id)
def test_config_validates(path):
    raw = yaml.safe_load(path.read_text())
    assert {"trainer", "model", "data"} <= set(raw), f"{path}: not a LightningCLI config"
    cfg = parse_config(path)
    model = cfg["model"]
    assert model["class_path"] in ("lpt_lightning.phases.AdaptPhase", "lpt_lightning.phases.GroupPromptPhase",
                                   "lpt_lightning.phases.MoEScorerPhase")
    assert cfg["data"]["source"]["class_path"].startswith("lpt_lightning.data.")
    # Every run writes under its own runs/<dataset>/<phase>_<expert> directory.
    root = cfg["trainer"]["default_root_dir"]
    assert root.startswith("runs/")
    ckpt = [c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    assert len(ckpt) == 1 and ckpt[0]["init_args"]["save_last"] in (True, "link")
    assert ckpt[0]["init_args"]["dirpath"] == f"{root}/checkpoints"


@pytest.mark.parametrize(
    "override, key",
    [
        ("--model.init_args.expert.promt_length=3", "promt_length"),  # unknown key
        ("--model.init_args.expert.prompt_length=abc", "prompt_length"),  # wrong type
        ("--model.init_args.optim.base_lr=fast", "base_lr"),
        ("--model.init_args.split_convention=lift", "split_convention"),
        ("--data.sampling=balanced", "data.sampling"),
    ],
)
def test_bad_override_fails_naming_the_key(override, key):
    message = parse_error(CONFIG_DIR / "places_lt_phase1.yaml", override)
    assert key in message


def test_unknown_key_in_a_config_file_fails(tmp_path):
    text = (CONFIG_DIR / "places_lt_phase2.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("top_k: 2", "topk: 2"))
    assert "topk" in parse_error(bad)


def test_unknown_class_path_fails(tmp_path):
    text = (CONFIG_DIR / "places_lt_phase1.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("lpt_lightning.phases.AdaptPhase", "lpt_lightning.phases.AdaptPhaze"))
    assert "AdaptPhaze" in parse_error(bad)


# ------------------------------------------------------------------ reference constants (SPEC 2-4)
@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("expert", ["visual", "vl"])
def test_benchmark_configs_have_reference_constants(dataset, expert):
    suffix = "_vl" if expert == "vl" else ""
    p1 = parse_config(CONFIG_DIR / f"{dataset}_phase1{suffix}.yaml")
    p2 = parse_config(CONFIG_DIR / f"{dataset}_phase2{suffix}.yaml")
    for cfg in (p1, p2):
        args = cfg["model"]["init_args"]
        loss, optim = args["loss"], args["optim"]
        assert (loss["kind"], loss["scale"], loss["margin"], loss["beta"]) == ("agcl", 20.0, 0.1, 0.5)
        assert loss["class_balanced_gammas"] == [0.0, 4.0] and loss["instance_gammas"] == [0.5, 8.0]
        assert (optim["base_lr"], optim["momentum"], optim["weight_decay"], optim["warmup_epochs"]) == (0.02, 0.9, 0.01, 1)
        assert args["split_convention"] == "lpt"
        data = cfg["data"]
        assert (data["sampling"], data["images_per_class"]) == ("dual", 4)
        assert cfg["trainer"]["max_epochs"] == 90
        assert cfg["trainer"]["precision"] == "bf16-mixed"

    a1 = p1["model"]["init_args"]
    assert p1["model"]["class_path"] == "lpt_lightning.phases.AdaptPhase"
    spec = a1["expert"]
    assert spec["kind"] == expert
    assert spec["backbone"]["name"] == REFERENCE_BACKBONE[expert]
    assert spec["backbone"]["pretrained"] == (True if expert == "visual" else "openai")
    assert spec["prompt_length"] == 10 and spec["adapters"] is True

    a2 = p2["model"]["init_args"]
    assert p2["model"]["class_path"] == "lpt_lightning.phases.GroupPromptPhase"
    assert a2["group_prompts"] == {"pool_size": 20, "top_k": 2, "start_block": 6, "length": 10}
    assert a2["loss"]["match_weight"] == 0.5
    # Phase 2 reads what phase 1 writes, and both use the same data.
    ckpt_dir = next(c for c in p1["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint"))
    assert a2["phase1_checkpoint"] == ckpt_dir["init_args"]["dirpath"] + "/last.ckpt"
    assert p1["data"] == p2["data"]


# ------------------------------------------------------------------ iNat18 at full size (random weights)
def test_inat18_phase2_builds_reference_shapes(tmp_path):
    from lpt_lightning.phases import AdaptPhase, GroupPromptPhase

    num_classes = 8142
    p1 = parse_config(CONFIG_DIR / "inat18_phase1.yaml")["model"]["init_args"]
    p2 = parse_config(CONFIG_DIR / "inat18_phase2.yaml")["model"]["init_args"]
    expert = dict(p1["expert"])
    expert["backbone"] = BackboneSpec(**(expert["backbone"] | {"pretrained": False}))  # no download
    phase1 = AdaptPhase(expert=ExpertSpec(**expert), num_classes=num_classes)
    ckpt = tmp_path / "phase1.ckpt"
    # Like a real phase checkpoint: everything but the frozen backbone, plus the metadata.
    state = {k: v for k, v in phase1.state_dict().items() if not k.startswith("expert.backbone.")}
    torch.save({"state_dict": state, "lpt": phase1.metadata()}, ckpt)
    del phase1

    phase2 = GroupPromptPhase(phase1_checkpoint=str(ckpt), group_prompts=GroupPromptSpec(**p2["group_prompts"]),
                              num_classes=num_classes)
    e = phase2.expert
    bb = e.backbone
    assert (bb.num_blocks, bb.embed_dim, bb.feature_dim, bb.img_size) == (12, 768, 768, 224)
    assert tuple(bb.model.patch_embed.patch_size) == (16, 16)
    assert tuple(e.shared_prompt.prompts.shape) == (12, 10, 768)
    assert tuple(e.group_prompts.prompts.shape) == (20, 6, 10, 768)
    assert tuple(e.group_prompts.keys.shape) == (20, 768)
    assert tuple(e.head.weight.shape) == (num_classes, 768)
    assert e.group_prompts.top_k == 2 and e.group_start == 6
    assert len(e.adapters) == 12
    trainable = {n for n, p in phase2.named_parameters() if p.requires_grad}
    assert trainable == {"expert.group_prompts.prompts", "expert.group_prompts.keys", "expert.head.weight"}
    n_trainable = sum(p.numel() for p in phase2.trainable_parameters())
    assert n_trainable == 20 * 6 * 10 * 768 + 20 * 768 + num_classes * 768


PIPELINE_CONFIGS = sorted(p for p in CONFIG_DIR.rglob("*_pipeline.yaml"))


@pytest.mark.parametrize("path", PIPELINE_CONFIGS, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_every_pipeline_config_composes_valid_phase_configs(path, tmp_path):
    from lpt_lightning.pipeline import _validate_configs, plan

    config = yaml.safe_load(path.read_text())
    assert config["run_dir"].startswith("runs/")
    runs = plan(str(tmp_path), config["data"], config.get("trainer"), config.get("experts") or ["visual", "vl"],
                config.get("phase1"), config.get("phase2"), config.get("phase3"), config.get("mixture", True),
                config.get("seed_everything", 0))
    expected = ["phase1_visual", "phase2_visual"] + (["phase1_vl", "phase2_vl"] if "vl" in config["experts"] else [])
    assert [r.name for r in runs if r.phase != "phase3"] == expected
    assert any(r.phase == "phase3" for r in runs) == config["mixture"]
    _validate_configs(runs)  # every phase parses with the real CLI parser
