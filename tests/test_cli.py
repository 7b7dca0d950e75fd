"""The ``lpt`` command end to end: help, phase 1 -> phase 2 -> test on Fashion-MNIST-LT through the
CLI with the tiny CPU configs, and the errors a user sees."""
from __future__ import annotations

import csv
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
def test_phase2_without_phase1_checkpoint_names_the_path(lpt, tmp_path):
    with pytest.raises(Exception) as exc:
        lpt("fit", "--config", str(CPU_CONFIGS / "fmnist_lt_phase2_visual.yaml"))
    assert "runs/fmnist_lt/phase1_visual/checkpoints/last.ckpt" in str(exc.value)
    assert "not found" in str(exc.value)
    missing = tmp_path / "elsewhere" / "phase1.ckpt"
    with pytest.raises(Exception) as exc:
        lpt("fit", "--config", str(CPU_CONFIGS / "fmnist_lt_phase2_visual.yaml"),
            f"--model.init_args.phase1_checkpoint={missing}")
    assert str(missing) in str(exc.value)
    assert not (tmp_path / "runs" / "fmnist_lt" / "phase2_visual" / "checkpoints").exists()


# ------------------------------------------------------------------ end to end
def run_pair(lpt, expert: str, capsys, caplog) -> tuple[Path, Path]:
    runs = Path("runs/fmnist_lt").resolve()
    lpt("fit", "--config", str(CPU_CONFIGS / f"fmnist_lt_phase1_{expert}.yaml"), "--trainer.max_epochs=1",
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

    lpt("fit", "--config", str(CPU_CONFIGS / f"fmnist_lt_phase2_{expert}.yaml"), "--trainer.max_epochs=1",
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
    lpt("test", "--config", str(CPU_CONFIGS / "fmnist_lt_phase2_visual.yaml"),
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
