"""The demo's stored result, `benchmarks/results/demo.json` (the summary `make demo` writes, its
wall time, date and command), and what is rendered from it: the README's demo block and the demo
section of docs/results.md.

    python -m benchmarks.report --store-demo runs/fmnist_lt_pipeline [--seconds 174]
"""
from __future__ import annotations

import json
import os
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, template
from lpt_lightning.metrics import METRIC_NAMES, SPLIT_KEYS, format_split_table

DEMO = REPO / "benchmarks" / "results" / "demo.json"
README_START, README_END = "<!-- demo:start -->", "<!-- demo:end -->"


def store_demo(run_dir: Path, seconds: float | None = None) -> dict[str, Any]:
    """demo.json from a finished demo's run directory. Without ``seconds`` (as `time make demo`
    measured it), the wall time is read from the run directory: from the first phase's config
    written at its start to the summary written at the end."""
    summary = run_dir / "metrics.json"
    if not summary.is_file():
        raise SystemExit(f"{summary} not found: run `make demo` first (its pipeline writes the summary there)")
    started = min((p.stat().st_mtime for p in run_dir.glob("*/config.yaml")), default=None)
    if seconds is None and started is None:
        raise SystemExit(f"{run_dir} has no phase config.yaml to time the run from: pass --seconds")
    ended = summary.stat().st_mtime
    payload = {"command": "make demo", "run_dir": f"runs/{run_dir.name}",
               "date": time.strftime("%Y-%m-%d", time.localtime(ended)),
               "seconds": round(seconds if seconds is not None else ended - started, 1),
               "timed_by": "--seconds" if seconds is not None else "file times (first phase config to summary)",
               "cpu_cores": os.cpu_count(), "summary": json.loads(summary.read_text())}
    DEMO.write_text(json.dumps(payload, indent=1) + "\n")
    return payload


def readme_block(demo: dict[str, Any]) -> str:
    """The README's demo table (the first table `make demo` prints) and its timing."""
    rows = demo["summary"]["results"]
    test = {k.removeprefix("test: "): v for k, v in rows.items() if k.startswith("test: ")}
    starts = [v for k, v in test.items() if k.endswith("no training")]
    best = max(starts, key=lambda v: v["acc"])
    vl_start, vl_end = test["vision-language expert, no training"], test["vision-language expert, phase 2"]
    counts = demo["summary"]["class_counts"]
    few = sorted(c for c in counts if c <= 20)
    return template("readme", "demo", summary=f"{demo['run_dir']}/metrics.json",
                    table=format_split_table({k: {s: v[s] for s in SPLIT_KEYS} for k, v in rows.items()}),
                    minutes=f"{demo['seconds'] / 60:.1f}", cores=demo["cpu_cores"], vl_start=f"{vl_start['acc']:.0f}",
                    vl_gain=f"{vl_end['acc'] - vl_start['acc']:.0f}",
                    gain=_points(test["LPT++ (scorer)"]["acc"], best["acc"]),
                    gain_few=_points(test["LPT++ (scorer)"]["acc_few"], best["acc_few"]),
                    few=f"{few[0]} and {few[-1]}" if len(few) > 1 else str(few[0]))


def _points(a: float, b: float) -> str:
    """a - b as the table shows them (2 decimals), to one decimal (exact: 90.05 - 84.70 is 5.35)."""
    return f"{Decimal(f'{a:.2f}') - Decimal(f'{b:.2f}'):.1f}"


def render_readme(readme: str, demo: dict[str, Any]) -> str:
    """The README with its demo block (between the demo:start / demo:end markers) rendered."""
    head, found, rest = readme.partition(README_START + "\n")
    _, found_end, tail = rest.partition(README_END)
    if not (found and found_end):
        raise SystemExit(f"README.md lacks the {README_START} ... {README_END} markers of the demo block")
    return f"{head}{README_START}\n{readme_block(demo)}\n{README_END}{tail}"


def _cell(row: dict[str, Any], key: str, class_names: list[str]) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if key == "worst_class_acc" and row.get("worst_class") is not None:
        return f"{value:.2f} ({class_names[row['worst_class']]})"
    return f"{value:.2f}"


def results_section(demo: dict[str, Any]) -> list[str]:
    """The demo's test rows with every metric, for docs/results.md."""
    summary = demo["summary"]
    names = summary["class_names"]
    rows = {k.removeprefix("test: "): v for k, v in summary["results"].items() if k.startswith("test: ")}
    head = ["overall", "many", "medium", "few", *METRIC_NAMES]
    lines = [template("results", "demo", command=demo["command"], date=demo["date"],
                      minutes=f"{demo['seconds'] / 60:.1f}", summary=f"{demo['run_dir']}/metrics.json"), "",
             "| test row | " + " | ".join(head) + " |", "| --- |" + " ---: |" * len(head)]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(_cell(row, k, names) for k in (*SPLIT_KEYS, *METRIC_NAMES)) + " |")
    return lines + [""]
