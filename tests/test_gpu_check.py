"""`benchmarks/gpu_check.py --dry-run`: the GPU check script runs end to end on the CPU at tiny shapes,
so it cannot rot before a GPU comes; its JSON has every figure, with sane values, and its page section."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(240)
def test_gpu_check_dry_run_writes_every_figure(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "bench_cuda.json").read_text())
    assert result["kind"] == "gpu_check" and result["dry_run"] and result["machine"]["precision"] == "fp32"
    assert set(result["sections_s"]) == {"train", "run_200", "loader"}

    train = result["train"]
    assert [(r["mode"], r["images_per_step"]) for r in train["rows"]] == [
        ("eager", 8), ("eager", 16), ("compiled", 8), ("compiled", 16)]
    for row in train["rows"]:
        assert row["images_per_s"] > 0 and row["flops_per_step"] > 0 and 0 < row["mfu"] < 1.5, row
    eager = {r["images_per_step"]: r for r in train["rows"] if r["mode"] == "eager"}
    assert eager[16]["flops_per_step"] == pytest.approx(2 * eager[8]["flops_per_step"], rel=0.05)  # counted, per image
    assert all(r["peak_gib"] > 0 for r in eager.values())
    assert all(r["first_step_s"] > 0 for r in train["rows"] if r["mode"] == "compiled")
    assert train["peak_source"].startswith("measured") and train["inference"]["images_per_s"] > 0

    run = result["run_200"]
    assert run["steps"] == 200 and run["loss_went_down"] and run["loss_last_20"] < 0.9 * run["loss_first_20"]
    loader = result["loader"]
    assert loader["workers"] == 2 and loader["images_per_s"] > 0
    assert loader["device_decode"]["images"] > 0 and loader["device_decode"]["images_per_s"] > 0

    page = (tmp_path / "benchmarks.md").read_text()
    assert "## GPU check:" in page and "dry run" in page and "went down" in page
