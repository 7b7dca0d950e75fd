"""The pipeline's summary: every evaluated row of every phase, in the order of training, in
``<run_dir>/metrics.json``, and the split table printed from such a file."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_only

from lpt_lightning.checkpoints.files import atomic_save
from lpt_lightning.data.transforms import TEST_TIME_VIEWS
from lpt_lightning.phases.moe_scorer import ROWS, row_name
from lpt_lightning.pipeline_plan import PhaseRun
from lpt_lightning.reports import DIGEST_KEYS, read_metrics, split_table
from lpt_lightning.test_priors import plot_test_priors


EXPERT_TITLES = {kind: ROWS[kind] for kind in ("visual", "vl")}


def summary_rows(runs: list[PhaseRun]) -> dict[str, dict[str, Any]]:
    """Every evaluated row of the pipeline, in the order of training: each expert before training,
    after phase 1 and after phase 2, then the fusions. Read from the phases' metrics.json files
    (per-class accuracies included); a phase that was not evaluated on a split has no row there."""
    phases: dict[str, dict[str, Any]] = {}
    for run in runs:
        path = run.directory / "metrics.json"
        if path.is_file():
            phases[run.name] = json.loads(path.read_text())
    phase3 = phases.get("phase3_moe", {}).get("results", {})
    rows: dict[str, dict[str, Any]] = {}
    for split in ("test", "val"):
        for expert, title in EXPERT_TITLES.items():
            for name, source, label in ((f"phase1_{expert}", f"{split}: no training", "no training"),
                                        (f"phase1_{expert}", split, "phase 1"),
                                        (f"phase2_{expert}", split, "phase 2")):
                row = phases.get(name, {}).get("results", {}).get(source)
                if row is None and label == "phase 2":  # phase 3 evaluated the phase-2 experts
                    row = phase3.get(row_name(split, title))
                if row is not None:
                    rows[f"{split}: {title}, {label}"] = row
        # Phase 3's val rows keep their name: the fusions were fitted on that split.
        for title in ("W_base fusion", "LPT++ (scorer)"):
            row = phase3.get(row_name(split, title))
            if row is not None:
                rows[row_name(split, title)] = row
        if split == "test":
            rows |= test_time_rows(runs)
    return rows


def test_time_rows(runs: list[PhaseRun]) -> dict[str, dict[str, Any]]:
    """The rows of `pipeline.test_with_augmentation`, named ``test (<augment>): <row>``."""
    rows: dict[str, dict[str, Any]] = {}
    for augment in (a for a in TEST_TIME_VIEWS if a != "none"):
        for run in runs:
            path = run.directory / f"test_time_{augment}.json"
            if not path.is_file():
                continue
            for name, row in json.loads(path.read_text())["results"].items():
                if run.phase == "phase3":  # "test: LPT++ (scorer)", "test: visual expert" (of phase 2)
                    title = name.split(": ", 1)[1]
                    title += ", phase 2" if title in EXPERT_TITLES.values() else ""
                elif name == "test":
                    title = f"{EXPERT_TITLES[run.name.split('_')[1]]}, phase 2"
                else:
                    continue
                rows[f"test ({augment}): {title}"] = row
    return rows


def write_summary(run_dir: Path, runs: list[PhaseRun]) -> dict[str, dict[str, Any]]:
    """``<run_dir>/metrics.json``: the pipeline's rows (``summary_rows``), on rank 0."""
    rows = summary_rows(runs)
    if not rows or rank_zero_only.rank != 0:
        return rows
    files = [json.loads((r.directory / "metrics.json").read_text()) for r in runs
             if (r.directory / "metrics.json").is_file()]
    first = files[0]
    payload = {k: first[k] for k in ("split_convention", "class_counts", "class_names")} | {
        k: next((f[k] for f in files if f.get(k)), None) for k in DIGEST_KEYS} | {
        "phases": {r.name: str(r.directory.relative_to(run_dir)) for r in runs}, "results": rows}
    atomic_save(lambda tmp: tmp.write_text(json.dumps(payload, indent=1)), run_dir / "metrics.json")
    plot_test_priors(run_dir / "test_priors.png", rows, run_dir.name)
    return rows


def split_table_from_file(path: Path) -> str:
    return split_table(read_metrics(path), json.loads(path.read_text()).get("class_names"))
