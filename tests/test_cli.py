"""The ``lpt`` command end to end: help, phase 1 -> phase 2 -> test on Fashion-MNIST-LT through the
CLI with the tiny CPU configs, and the errors a user sees."""
from __future__ import annotations

import csv
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lpt_lightning.cli import main
from datasets_available import needs_fmnist

REPO = Path(__file__).resolve().parents[1]
CPU_CONFIGS = REPO / "configs" / "cpu"
SPLIT_COLUMNS = ("val/acc", "val/acc_many", "val/acc_medium", "val/acc_few")


@pytest.fixture
def lpt(monkeypatch, tmp_path, caplog):
    """Run ``lpt ARGS`` in-process in an empty working directory (configs write under ./runs).

    One intra-op thread: the tiny models gain nothing from more, and on a shared 2-core machine
    extra threads fight over the cores.
    """
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lpt"])  # LightningCLI warns when it sees pytest's command line
    caplog.set_level(logging.INFO)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def run(*args: str) -> None:
        main(list(args))

    yield run
    torch.set_num_threads(threads)


def console_output(capsys, caplog) -> str:
    """What the user sees: rank_zero_info goes through logging, the rest to stdout/stderr."""
    out, err = capsys.readouterr()
    return caplog.text + out + err


def check_small_checkpoint(path: Path, phase: str) -> dict:
    assert path.is_file(), f"{path} missing"
    assert path.stat().st_size < 1_000_000, f"{path} is {path.stat().st_size} bytes"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    keys = list(ckpt["state_dict"])
    assert keys and not [k for k in keys if k.startswith("expert.backbone.")]
    assert ckpt["lpt"]["phase"] == phase
    return ckpt


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    files = sorted(run_dir.glob("logs/version_*/metrics.csv"))
    assert files, f"no metrics.csv under {run_dir}/logs"
    with open(files[0], newline="") as fh:
        return list(csv.DictReader(fh))


def check_split_metrics(run_dir: Path) -> None:
    rows = read_metrics(run_dir)
    assert set(SPLIT_COLUMNS) <= set(rows[0])
    val = [r for r in rows if r["val/acc"]]
    assert val, "no validation row"
    for column in SPLIT_COLUMNS:
        assert 0.0 <= float(val[-1][column]) <= 100.0


# ------------------------------------------------------------------ help and errors
def test_fit_help_lists_the_config_groups(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lpt"])
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--help"])
    assert exc.value.code in (0, None)
    out = capsys.readouterr().out
    for option in ("--model", "--data", "--trainer", "--config", "--print_config"):
        assert option in out


def test_console_script_runs():
    lpt = Path(sys.executable).parent / "lpt"
    if not lpt.is_file():
        pytest.skip(f"console script not installed next to {sys.executable}")
    proc = subprocess.run([str(lpt), "fit", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--model" in proc.stdout and "--data" in proc.stdout and "--trainer" in proc.stdout


@needs_fmnist
def test_phase2_without_phase1_checkpoint_names_the_path(lpt, tmp_path, capsys):
    def error(*args: str) -> str:
        with pytest.raises(SystemExit) as exc:
            lpt(*args)
        assert exc.value.code == 2
        return capsys.readouterr().err

    message = error("fit", "--config", str(CPU_CONFIGS / "fmnist_lt_phase2.yaml"))
    assert "runs/fmnist_lt/phase1_visual/checkpoints/last.ckpt: checkpoint not found" in message
    assert "Traceback" not in message and "Union subtypes" not in message
    missing = tmp_path / "elsewhere" / "phase1.ckpt"
    message = error("fit", "--config", str(CPU_CONFIGS / "fmnist_lt_phase2.yaml"),
                    f"--model.init_args.phase1_checkpoint={missing}")
    assert str(missing) in message
    assert not (tmp_path / "runs" / "fmnist_lt" / "phase2_visual" / "checkpoints").exists()


# ------------------------------------------------------------------ end to end
def run_pair(lpt, expert: str, capsys, caplog) -> tuple[Path, Path]:
    runs = Path("runs/fmnist_lt").resolve()
    suffix = "" if expert == "visual" else f"_{expert}"  # configs/<dataset>_phase1.yaml is the visual expert
    lpt("fit", "--config", str(CPU_CONFIGS / f"fmnist_lt_phase1{suffix}.yaml"), "--trainer.max_epochs=1",
        "--trainer.enable_progress_bar=false")
    p1 = runs / f"phase1_{expert}"
    ckpt1 = check_small_checkpoint(p1 / "checkpoints" / "last.ckpt", "adapt")
    assert ckpt1["lpt"]["expert"]["kind"] == expert
    check_split_metrics(p1)
    text = console_output(capsys, caplog)
    assert "Split accuracy" in text and "trainable parameters" in text
    if expert == "vl":
        assert "head initialised from CLIP text embeddings of 10 class names" in text
    caplog.clear()

    lpt("fit", "--config", str(CPU_CONFIGS / f"fmnist_lt_phase2{suffix}.yaml"), "--trainer.max_epochs=1",
        "--trainer.enable_progress_bar=false")
    p2 = runs / f"phase2_{expert}"
    ckpt2 = check_small_checkpoint(p2 / "checkpoints" / "last.ckpt", "group_prompt")
    assert any(k.startswith("expert.group_prompts.") for k in ckpt2["state_dict"])
    # Phase 2 froze phase 1's prompt and adapters: they are saved unchanged.
    for key, value in ckpt1["state_dict"].items():
        if key.startswith(("expert.shared_prompt.", "expert.adapters.")):
            assert torch.equal(value, ckpt2["state_dict"][key]), key
    check_split_metrics(p2)
    console_output(capsys, caplog)
    caplog.clear()
    return p1, p2


@needs_fmnist
def test_visual_phase1_phase2_test(lpt, capsys, caplog):
    _, p2 = run_pair(lpt, "visual", capsys, caplog)
    lpt("test", "--config", str(CPU_CONFIGS / "fmnist_lt_phase2.yaml"),
        "--ckpt_path", str(p2 / "checkpoints" / "last.ckpt"), "--trainer.enable_progress_bar=false")
    text = console_output(capsys, caplog)
    assert "Split accuracy (%, lpt convention)" in text
    table = text[text.index("Split accuracy"):]
    header = next(line for line in table.splitlines() if "overall" in line)
    assert header.split() == ["overall", "many", "medium", "few"]
    row = next(line for line in table.splitlines() if line.startswith("test "))
    assert all(0.0 <= float(v) <= 100.0 for v in row.split()[1:])


@needs_fmnist
def test_vl_phase1_phase2(lpt, capsys, caplog):
    run_pair(lpt, "vl", capsys, caplog)


def test_pipeline_dotted_overrides_merge_into_nested_sections():
    from lpt_lightning.pipeline_cli import split_nested_overrides

    rest, nested = split_nested_overrides(["--config", "p.yaml", "--data.source.init_args.root=/d",
                                           "--phase1.trainer.max_epochs", "3", "--run_dir=r", "--data.batch_size=8"])
    assert rest == ["--config", "p.yaml", "--run_dir=r"]
    assert nested == {"data": {"source": {"init_args": {"root": "/d"}}, "batch_size": 8},
                      "phase1": {"trainer": {"max_epochs": 3}}}


# ------------------------------------------------------------------ commands
def test_help_lists_every_subcommand(capsys, monkeypatch):
    from lpt_lightning.cli import LIGHTNING_SUBCOMMANDS, SUBCOMMANDS

    monkeypatch.setattr(sys, "argv", ["lpt"])
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    names = [*LIGHTNING_SUBCOMMANDS, *SUBCOMMANDS]
    assert {"fit", "validate", "test", "predict", "pipeline", "export", "convert"} <= set(names)
    for name in names:
        assert f"    {name} " in out, name
    with pytest.raises(SystemExit) as exc:
        main(["fitt"])
    assert exc.value.code == 2
    assert "invalid choice: 'fitt'" in capsys.readouterr().err


def subcommand_names() -> list[str]:
    from lpt_lightning.cli import LIGHTNING_SUBCOMMANDS, SUBCOMMANDS

    return [*LIGHTNING_SUBCOMMANDS, *SUBCOMMANDS]


@pytest.mark.parametrize("name", subcommand_names())
def test_every_subcommand_has_its_own_help(name, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lpt"])
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code in (0, None)
    usage = capsys.readouterr().out.splitlines()[0]
    assert usage.startswith("usage: lpt ") and f" {name}" in usage, usage  # LightningCLI's: lpt [options] NAME


# ------------------------------------------------------------------ lpt pipeline: parsing
def test_repeated_config_merges_nested_sections(tmp_path):
    from lpt_lightning.pipeline_plan import ExpertPhaseSection, PhaseSection, plan
    from lpt_lightning.pipeline_cli import parse

    base = CPU_CONFIGS / "fmnist_lt_pipeline.yaml"
    piece = tmp_path / "piece.yaml"
    piece.write_text(yaml.safe_dump({
        "data": {"batch_size": 8, "source": {"init_args": {"seed": 3}}},
        "phase1": {"trainer": {"max_epochs": 4}, "model": {"optim": {"momentum": 0.5}}},
        "phase3": {"model": {"scorer": {"hidden_dim": 8}}},
    }))
    settings = parse(["--config", str(base), "--config", str(piece), "--phase2.model.group_prompts.pool_size=3",
                      "--run_dir", str(tmp_path / "run")])
    original = yaml.safe_load(base.read_text())
    data = settings["data"]
    assert data["source"]["class_path"] == "lpt_lightning.data.FashionMNISTSource"
    assert data["source"]["init_args"]["seed"] == 3 and data["source"]["init_args"]["imbalance_ratio"] == 100
    assert data["batch_size"] == 8 and data["eval_batch_size"] == 500 and data["augment"] is False
    assert isinstance(settings["phase1"], ExpertPhaseSection) and isinstance(settings["phase3"], PhaseSection)
    assert settings["phase1"].trainer == {"max_epochs": 4}
    assert settings["phase1"].model == {"optim": {"base_lr": 0.5, "warmup_epochs": 0, "momentum": 0.5}}
    # The expert piece the base names, relative to the base, with ExpertSpec's defaults filled in.
    assert settings["phase1"].visual.expert == full_expert(CPU_CONFIGS / original["phase1"]["visual"]["expert"])
    assert settings["phase2"].model["group_prompts"] == {"pool_size": 3, "top_k": 2, "start_block": 3, "length": 4}
    assert settings["phase3"].model == {"scorer": {"hidden_dim": 8, "lr": 0.003}}
    assert settings["phase3"].data == {"sampling": "class_aware"}
    runs = {r.name: r.config for r in plan(settings["run_dir"], settings["data"], settings["trainer"],
                                           settings["experts"], settings["phase1"], settings["phase2"],
                                           settings["phase3"], settings["mixture"], settings["seed_everything"])}
    assert runs["phase1_vl"]["model"]["init_args"]["optim"]["momentum"] == 0.5
    assert runs["phase1_vl"]["trainer"]["max_epochs"] == 4 and runs["phase1_vl"]["trainer"]["limit_train_batches"] == 30
    assert runs["phase2_visual"]["data"]["batch_size"] == 8


def full_expert(piece: Path) -> dict:
    """An expert piece's values over ExpertSpec's defaults, as plain data."""
    from dataclasses import asdict

    from lpt_lightning.models.backbones import BackboneSpec
    from lpt_lightning.models.expert import ExpertSpec

    values = yaml.safe_load(piece.read_text())
    return asdict(ExpertSpec(**values | {"backbone": BackboneSpec(**values["backbone"])}))


def test_pipeline_pieces_load_relative_to_their_file_and_merge_key_by_key(tmp_path, monkeypatch):
    from lpt_lightning.pipeline_plan import plan
    from lpt_lightning.pipeline_cli import parse

    monkeypatch.chdir(tmp_path)  # piece paths in files are relative to the file, not the working directory
    base = CPU_CONFIGS / "fmnist_lt_pipeline.yaml"
    (tmp_path / "pieces").mkdir()
    (tmp_path / "pieces" / "data.yaml").write_text(yaml.safe_dump({"batch_size": 8, "num_workers": 0}))
    (tmp_path / "pieces" / "vl.yaml").write_text(yaml.safe_dump({"prompt_length": 6}))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "over.yaml").write_text(yaml.safe_dump({
        "data": "../pieces/data.yaml", "phase1": {"vl": {"expert": "../pieces/vl.yaml", "optim": {"base_lr": 0.1}}}}))
    settings = parse(["--config", str(base), "--config", "mine/over.yaml",
                      "--phase1.visual.expert.backbone.checkpoint_path=/w/vit.safetensors", "--data.source.init_args.seed=3",
                      "--trainer", str(REPO / "configs" / "trainer" / "cpu.yaml")])
    demo_data = yaml.safe_load((REPO / "configs" / "data" / "fmnist_lt_demo.yaml").read_text())
    data = settings["data"]
    assert data["source"]["init_args"] == demo_data["source"]["init_args"] | {"seed": 3, "root": None, "class_order_seed": None}
    assert (data["batch_size"], data["num_workers"], data["eval_batch_size"], data["augment"]) == (8, 0, 500, False)
    assert "__path__" not in data and "__path__" not in settings["phase1"].vl.expert
    # A later expert piece sets what it names; the rest stays the earlier piece's.
    assert settings["phase1"].vl.expert == full_expert(REPO / "configs" / "expert" / "standin_vl.yaml") | {"prompt_length": 6}
    visual = full_expert(REPO / "configs" / "expert" / "standin_visual_class_mean.yaml")
    visual["backbone"]["checkpoint_path"] = "/w/vit.safetensors"
    assert settings["phase1"].visual.expert == visual
    # --trainer PIECE merges into the file's trainer: the piece's values, the file's others.
    trainer = settings["trainer"]
    assert (trainer["log_every_n_steps"], trainer["num_nodes"], trainer["limit_train_batches"]) == (5, 1, 30)
    runs = {r.name: r.config for r in plan(str(tmp_path / "run"), settings["data"], settings["trainer"],
                                           settings["experts"], settings["phase1"], settings["phase2"],
                                           settings["phase3"], settings["mixture"], settings["seed_everything"])}
    vl = runs["phase1_vl"]["model"]["init_args"]
    assert vl["expert"]["prompt_length"] == 6 and vl["optim"] == {"base_lr": 0.1, "warmup_epochs": 0}
    assert runs["phase1_visual"]["model"]["init_args"]["optim"] == {"base_lr": 0.5, "warmup_epochs": 0}
    assert runs["phase1_visual"]["model"]["init_args"]["expert"] == visual
    assert [c["class_path"].rsplit(".", 1)[1] for c in runs["phase1_vl"]["trainer"]["logger"]] == ["CSVLogger"]


def test_a_later_expert_piece_brings_its_whole_architecture():
    """Dicts inside an expert (backbone.model_kwargs) are replaced, not merged, as in ``lpt fit``:
    the tiny expert over the stand-in keeps none of the stand-in's architecture."""
    from lpt_lightning.pipeline_cli import parse

    tiny = REPO / "configs" / "expert" / "tiny_visual.yaml"
    for args in (["--phase1.visual.expert", str(tiny)], ["--config", yaml.safe_dump({"phase1": {"visual": {"expert": str(tiny)}}})]):
        settings = parse(["--config", str(CPU_CONFIGS / "fmnist_lt_pipeline.yaml"), *args])
        expert = settings["phase1"].visual.expert
        assert expert["backbone"]["model_kwargs"] == yaml.safe_load(tiny.read_text())["backbone"]["model_kwargs"]
        assert expert["head_init"] == "class_mean"  # not set by the tiny piece: the earlier piece's


def test_pipeline_print_config_shows_the_nested_overrides(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lpt"])
    with pytest.raises(SystemExit) as exc:
        main(["pipeline", "--config", str(CPU_CONFIGS / "fmnist_lt_pipeline.yaml"), "--print_config",
              "--phase1.trainer.max_epochs=7", "--data.source.init_args.seed=5"])
    assert exc.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["phase1"]["trainer"] == {"max_epochs": 7} and printed["phase1"]["visual"]["expert"]["kind"] == "visual"
    assert printed["data"]["source"]["class_path"] == "lpt_lightning.data.FashionMNISTSource"
    assert printed["data"]["source"]["init_args"]["seed"] == 5 and printed["data"]["batch_size"] == 32


@pytest.mark.parametrize("piece, message", [
    ({"phase2": {"modle": {"pool_size": 3}}}, "Group 'phase2' does not accept option 'modle.pool_size'"),
    ({"phase3": {"visual": {"expert": {"kind": "visual"}}}}, "Group 'phase3' does not accept option 'visual.expert.kind'"),
    ({"mixtrue": False}, "'mixtrue' is not accepted"),
])
def test_pipeline_config_with_an_unknown_key_is_refused(piece, message, tmp_path, capsys):
    from lpt_lightning.pipeline_cli import parse

    path = tmp_path / "piece.yaml"
    path.write_text(yaml.safe_dump(piece))
    with pytest.raises(SystemExit) as exc:
        parse(["--config", str(CPU_CONFIGS / "fmnist_lt_pipeline.yaml"), "--config", str(path)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------ lpt predict on an export
def tiny_phase_files(root: Path) -> dict[str, Path]:
    """Images in three class folders, a tiny ViT's weights file, trained-looking phase-1 and
    phase-2 checkpoints (every trained tensor random, so only loading them reproduces the
    predictions) and a config per phase."""
    from dataclasses import asdict

    import lightning as L
    from PIL import Image
    from safetensors.torch import save_file
    from tiny_models import tiny_backbone

    from lpt_lightning.checkpoints import is_saved_key
    from lpt_lightning.models.backbones import build_backbone
    from lpt_lightning.models.expert import ExpertSpec, GroupPromptSpec
    from lpt_lightning.phases import AdaptPhase, GroupPromptPhase

    rng = np.random.default_rng(0)
    lines = []
    for label in range(3):
        for i in range(3):
            path = root / "data" / f"c{label}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(path)
            lines.append(f"c{label}/{i}.png {label}")
    (root / "data" / "train.txt").write_text("\n".join(lines) + "\n")
    (root / "data" / "classes.txt").write_text("shirt\nshoe\nbag\n")
    torch.manual_seed(0)
    backbone = tiny_backbone("visual")
    weights = root / "weights" / "vit_tiny.safetensors"
    weights.parent.mkdir()
    save_file({k: v.contiguous() for k, v in build_backbone("visual", backbone).model.state_dict().items()},
              str(weights))
    backbone.checkpoint_path = str(weights)
    expert = ExpertSpec(kind="visual", backbone=backbone, prompt_length=2)
    group = GroupPromptSpec(pool_size=4, top_k=2, start_block=2, length=2)
    run = root / "run"

    def save(phase, name: str) -> Path:
        with torch.no_grad():
            for key, value in phase.state_dict().items():
                if is_saved_key(key) and value.is_floating_point():
                    value.copy_(torch.randn_like(value))
        path = run / name / "final.ckpt"
        path.parent.mkdir(parents=True)
        torch.save({"state_dict": {k: v for k, v in phase.state_dict().items() if is_saved_key(k)},
                    "lpt": phase.metadata(), "pytorch-lightning_version": L.__version__}, path)
        return path

    names = ["shirt", "shoe", "bag"]
    phase1 = save(AdaptPhase(expert=expert, num_classes=3, class_names=names), "phase1")
    phase2 = save(GroupPromptPhase(phase1_checkpoint=str(phase1), group_prompts=group, num_classes=3,
                                   class_names=names), "phase2")

    def config(name: str, model: dict) -> Path:
        path = root / "configs" / f"{name}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(yaml.safe_dump({
            "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
                        "default_root_dir": str(run / name)},
            "model": model,
            "data": {"source": {"class_path": "lpt_lightning.data.AnnotationListSource",
                                "init_args": {"root": str(root / "data"), "train_list": "train.txt",
                                              "val_list": "train.txt", "class_names_file": "classes.txt"}},
                     "batch_size": 4, "num_workers": 0, "predict_paths": str(root / "data")},
        }))
        return path

    return {
        "phase1.ckpt": phase1, "phase2.ckpt": phase2, "run": run,
        "phase1.yaml": config("phase1", {"class_path": "lpt_lightning.phases.AdaptPhase",
                                         "init_args": {"expert": asdict(expert)}}),
        "phase2.yaml": config("phase2", {"class_path": "lpt_lightning.phases.GroupPromptPhase",
                                         "init_args": {"phase1_checkpoint": str(phase1),
                                                       "group_prompts": asdict(group)}}),
    }


def test_predict_on_exports_needs_no_run_directory(lpt, tmp_path, capsys):
    import shutil

    files = tiny_phase_files(tmp_path)
    out = tmp_path / "out"
    for phase in ("phase1", "phase2"):
        lpt("predict", "--config", str(files[f"{phase}.yaml"]), "--ckpt_path", str(files[f"{phase}.ckpt"]),
            "--prediction.output", str(out / f"{phase}_ckpt.csv"), "--prediction.top_k", "3")
        lpt("export", str(files[f"{phase}.ckpt"]), str(out / f"{phase}.safetensors"))
    shutil.rmtree(files["run"])  # every checkpoint, phase 2's phase1_checkpoint included
    for phase in ("phase1", "phase2"):
        lpt("predict", "--config", str(files[f"{phase}.yaml"]), "--ckpt_path", str(out / f"{phase}.safetensors"),
            "--prediction.output", str(out / f"{phase}_export.csv"), "--prediction.top_k", "3")
        expected = (out / f"{phase}_ckpt.csv").read_text()
        assert (out / f"{phase}_export.csv").read_text() == expected
        rows = list(csv.DictReader(expected.splitlines()))
        assert len(rows) == 9 and {r["top1_name"] for r in rows} <= {"shirt", "shoe", "bag"}
    # The two phases predict differently: each export's own tensors are used.
    assert (out / "phase1_export.csv").read_text() != (out / "phase2_export.csv").read_text()
    capsys.readouterr()

    def error(*args: str) -> str:
        with pytest.raises(SystemExit) as exc:
            lpt(*args)
        assert exc.value.code == 2
        return capsys.readouterr().err

    message = error("predict", "--config", str(files["phase1.yaml"]), "--ckpt_path", str(out / "phase2.safetensors"))
    assert "phase2.safetensors: written by phase 'group_prompt', expected a checkpoint of phase 'adapt'" in message
    message = error("test", "--config", str(files["phase2.yaml"]), "--ckpt_path", str(out / "phase2.safetensors"))
    assert "phase2.safetensors: an export holds no trainer state" in message and "`lpt predict` takes" in message


def _predict_with_writer(writer, items: list[str], batch_size: int = 500, fail_at: int | None = None,
                         before_end=lambda: None):
    """PredictionWriter fed ``items`` (the dataset's list, held by the datamodule) as images of 100
    classes in batches, as the predict loop feeds it; ``before_end`` runs after the last batch."""
    from types import SimpleNamespace

    num_images = len(items)
    trainer = SimpleNamespace(world_size=1, global_rank=0, datamodule=SimpleNamespace(predict_items=lambda: items))
    module = SimpleNamespace(class_names=[f"class {c}" for c in range(100)])
    writer.on_predict_epoch_start(trainer, module)
    generator = torch.Generator().manual_seed(0)
    for b, start in enumerate(range(0, num_images, batch_size)):
        if b == fail_at:
            writer.on_exception(trainer, module, RuntimeError("a batch failed"))
            return
        index = torch.arange(start, min(start + batch_size, num_images))
        probs = torch.rand(len(index), 100, generator=generator).softmax(-1)
        writer.write_on_batch_end(trainer, module, {"index": index, "probs": probs}, None, None, b)
    before_end()
    writer.on_predict_epoch_end(trainer, module)


def test_prediction_rows_are_written_as_batches_come_memory_flat_in_the_images(tmp_path):
    """Rows go to the file batch by batch, in the loader's order: the writer's memory does not
    grow with the number of images (nor does the CLI keep the probabilities: return_predictions
    is off); a failure leaves no file."""
    import json
    import tracemalloc

    import lpt_lightning.prediction
    from lpt_lightning.prediction import PredictionWriter

    def images(n):
        return [f"img/{i:06d}.jpg" for i in range(n)]

    def held_by_the_writer():  # memory allocated in prediction.py and still held after the last batch
        traces = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, lpt_lightning.prediction.__file__)])
        held.append(sum(stat.size for stat in traces.statistics("filename")))

    held = []
    tracemalloc.start()
    try:
        for n in (2_000, 20_000):
            _predict_with_writer(PredictionWriter(str(tmp_path / f"{n}.csv"), top_k=3), images(n),
                                 before_end=held_by_the_writer)
            rows = list(csv.DictReader((tmp_path / f"{n}.csv").read_text().splitlines()))
            assert [r["image"] for r in rows] == images(n)
    finally:
        tracemalloc.stop()
    assert held[1] < held[0] + 50_000, held  # 18,000 more rows kept would take megabytes

    _predict_with_writer(PredictionWriter(str(tmp_path / "p.json"), top_k=2), images(7), batch_size=3)
    text = (tmp_path / "p.json").read_text()
    records = json.loads(text)
    assert text == json.dumps(records, indent=1) and len(records) == 7 and records[6]["image"] == "img/000006.jpg"
    _predict_with_writer(PredictionWriter(str(tmp_path / "empty.json")), [])
    assert json.loads((tmp_path / "empty.json").read_text()) == []

    _predict_with_writer(PredictionWriter(str(tmp_path / "failed.csv")), images(2_000), fail_at=2)
    assert not list(tmp_path.glob("*failed.csv*"))


@pytest.mark.parametrize("value, parsed", [("1", 1), ("1.0", 1.0), ("0.25", 0.25), ("30", 30)])
def test_a_batch_limit_of_1_means_one_batch(value, parsed, tmp_path):
    """Lightning reads an int limit as batches and a float as a fraction: ``limit_val_batches: 1``
    must stay the int 1 (one batch), not become 1.0 (every batch), in ``lpt fit`` and ``lpt pipeline``."""
    from lpt_lightning.lightning_cli import parse_config
    from lpt_lightning.pipeline_cli import parse

    config = parse_config(["fit", "--config", "configs/cpu/fmnist_lt_phase1.yaml", f"--trainer.limit_val_batches={value}",
                           f"--trainer.limit_train_batches={value}"])
    assert [type(config.fit.trainer.limit_val_batches), config.fit.trainer.limit_val_batches] == [type(parsed), parsed]
    assert type(config.fit.trainer.limit_train_batches) is type(parsed)
    settings = parse(["--config", "configs/cpu/fmnist_lt_pipeline.yaml", f"--trainer.limit_test_batches={value}"])
    assert type(settings["trainer"]["limit_test_batches"]) is type(parsed)
    # The trainer built from it keeps the type (a YAML file written as 1 likewise).
    from lpt_lightning.cli_parsing import LPTTrainer

    trainer = LPTTrainer(limit_val_batches=parsed, logger=False, default_root_dir=tmp_path)
    assert type(trainer.limit_val_batches) is type(parsed) and trainer.limit_train_batches == 1.0
