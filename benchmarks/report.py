"""Render every generated page from the stored results in benchmarks/results/.

docs/benchmarks.md (bench_*.json and the other speed results), docs/results.md (accuracy_*.json,
diagnosis_*.json, demo.json; `benchmarks/accuracy_study.py`) and the README's demo block (demo.json).

    python -m benchmarks.report --render                                 # rewrite the three pages
    python -m benchmarks.report --store-demo runs/fmnist_lt_pipeline     # store a finished `make demo`, then render
"""
from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import INAT_CLASSES, REPO, template

# Reference GPU peaks (dense bf16, vendor data sheets) for the *estimates* of how fast a GPU would
# consume images; a --device cuda run replaces them with measurements.
GPU_PEAKS = {"A100 (312 TFLOP/s bf16)": 312e12, "H100 SXM (989 TFLOP/s bf16)": 989e12}
ASSUMED_GPU_MFU = 0.40
# The data-loading projection: can one node's CPU cores feed one GPU?
PROJECTION_GPU = "H100 SXM (989 TFLOP/s bf16)"
NODE_CORES = 16
NODE_WORKERS = NODE_CORES - 1  # one core for the training process (scripts/slurm: workers = cores - 1 per rank)
PHASE_NAMES = {"phase1": "phase 1", "phase2": "phase 2", "phase3": "phase 3"}
EXPERT_NAMES = {"visual": "visual (timm ViT-B/16)", "vl": "VL (CLIP ViT-B/16)", "scorer": "MoE scorer"}


def _f(x: float | None, nd: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:,.{nd}f}"


def _ok(value: float, target: float) -> str:
    return "yes" if value <= target else "**no**"


def _load(results: Path) -> list[dict[str, Any]]:
    """Full runs per device; a quick run only where no full run of that device exists (results of
    benchmarks/gpu_check.py have a section of their own)."""
    runs = {}
    for path in sorted(results.glob("bench_*.json")):
        data = json.loads(path.read_text())
        if data.get("kind") == "gpu_check":
            continue
        device = path.stem.replace("bench_", "").replace("_quick", "")
        if device not in runs or (runs[device]["quick"] and not data.get("quick")):
            runs[device] = data
    return [runs[d] for d in sorted(runs, key=lambda d: d != "cpu")]


def _train_rows(model: dict[str, Any], phase: str, expert: str) -> list[dict[str, Any]]:
    return [r for r in model["train"] if r["phase"] == phase and r["expert"] == expert and not r.get("oom")]


def _mfu(row: dict[str, Any], peak: float) -> float:
    """Paired MFU (step FLOP/s over a matmul probe timed in the same rounds) when measured."""
    return row["mfu_paired"]["median"] if "mfu_paired" in row else row["achieved_flops_per_s"] / peak


def _largest(model: dict[str, Any], phase: str, expert: str) -> dict[str, Any] | None:
    rows = _train_rows(model, phase, expert)
    return max(rows, key=lambda r: r["batch_per_stream"]) if rows else None


def _inference(model: dict[str, Any], name_start: str) -> dict[str, Any] | None:
    for row in model.get("inference", {}).get("rows", []):
        if row["name"].startswith(name_start):
            return row
    return None


def summary(run: dict[str, Any]) -> list[str]:
    model, lines = run.get("model"), []
    if not model:
        return lines
    lines += ["| figure | naive / limit | target | measured | met |", "| --- | --- | --- | --- | --- |"]
    for pr in model.get("prefix_reuse", []):
        if pr:
            r = pr["ratio"]
            lines.append(f"| phase-2 step, prefix reuse / two-pass, {EXPERT_NAMES[pr['expert']]} | 1.0 / FLOP ratio "
                         f"{pr['flop_ratio']:.3f} | <= 0.82 | {r['median']:.3f} (rounds {r['min']:.3f}-{r['max']:.3f}) "
                         f"| {_ok(r['median'], 0.82)} |")
    plain = "per image, x one plain ViT-B/16 forward"
    for name, label, naive, target in (
            ("LPT++ mixture, prefix reuse", f"LPT++ inference {plain}", 4.0, 3.2),
            ("LPT, prefix reuse", f"LPT inference {plain}", 2.0, 1.65),
            ("LPT++ mixture, before the kept-token fix", "(before the kept-token fix: LPT++ inference)", 4.0, 3.2),
            ("LPT, before the kept-token fix", "(before the kept-token fix: LPT inference)", 2.0, 1.65)):
        row = _inference(model, name)
        if row:
            m = row["multiple"]
            lines.append(f"| {label} | {naive} / FLOPs x{row['flop_multiple']:.2f} | <= {target} | {m['median']:.2f} "
                         f"(rounds {m['min']:.2f}-{m['max']:.2f}) | {_ok(m['median'], target)} |")
    peak = model["matmul_peak"]["flops_per_s"]
    for expert in ("visual", "vl"):
        row = _largest(model, "phase1", expert)
        if row:
            lines.append(f"| phase-1 MFU, {EXPERT_NAMES[expert]}, B = {row['batch_per_stream']} x 2 | - | - | "
                         f"{100 * _mfu(row, peak):.0f}% of the measured fp32 matmul rate | - |")
    share = scorer_share(model)
    if share:
        record = (model.get("section_runs") or {}).get("phase3")
        where = ("this machine" if not record or record.get("machine", {}).get("cpu") == run["machine"].get("cpu")
                 else "phase 3 rerun on another CPU, see Phase 3")
        lines.append(f"| phase-3 scorer epoch / one phase-2 epoch (visual expert), {where} | - | < 2% | "
                     f"{100 * share['this_machine']:.4f}% | {_ok(share['this_machine'], 0.02)} |")
        for batch, per_gpu in share["gpu_estimates"].items():
            for gpu, value in per_gpu.items():
                lines.append(f"| same, **estimate** for {gpu} at {ASSUMED_GPU_MFU:.0%} MFU, scorer batch {batch} "
                             f"(see phase 3) | - | < 2% | ~{100 * value:.1f}% | {_ok(value, 0.02)} |")
    proj = projection(run.get("data") or {}, model)
    goal = proj and proj["goal"]
    if goal:
        lines.append(f"| phase 2: images/s a {NODE_CORES}-core node supplies from prepared data, **projection** "
                     f"({NODE_WORKERS} workers x best per-worker rate here, {goal['copy']}) | - | >= {goal['demand']:,.0f} "
                     f"(one H100, **estimate**, see Data loading) | {goal['supply']:,.0f} | "
                     f"{'yes' if goal['met'] else '**no**'} |")
    return lines + [""]


def _bare_step(model: dict[str, Any], batch: int) -> dict[str, Any] | None:
    return next((r for r in model.get("phase3_steps", []) if r["batch"] == batch), None)


def _loop_overhead(model: dict[str, Any], epoch: dict[str, Any] | None) -> float | None:
    """Host-side seconds per sample of a scorer epoch beyond the scorer's own step: Lightning's
    loop and optimizer wrapping, ``self.log``, the sampler and the batch reads (what a GPU host
    pays too). Best epoch against the best bare step (both best-of-N)."""
    if not epoch:
        return None
    bare = _bare_step(model, epoch["batch"])
    return max(epoch["s_per_sample"] - (bare["step_s_min"] / bare["batch"] if bare else 0.0), 0.0)


def scorer_share(model: dict[str, Any]) -> dict[str, Any] | None:
    epoch, p2 = model.get("phase3_epoch"), _largest(model, "phase2", "visual")
    if not epoch or not p2:
        return None
    per_sample_p2 = p2["step_s"] / p2["batch_per_stream"]
    flops_per_sample = p2["flops_per_step"] / p2["batch_per_stream"]
    gpu_p2 = {gpu: flops_per_sample / (peak * ASSUMED_GPU_MFU) for gpu, peak in GPU_PEAKS.items()}
    est = {}
    for key in ("phase3_epoch", "phase3_epoch_large_batch"):
        overhead = _loop_overhead(model, model.get(key))
        if overhead is not None:
            est[model[key]["batch"]] = {gpu: overhead / t for gpu, t in gpu_p2.items()}
    return {"this_machine": epoch["s_per_sample"] / per_sample_p2, "gpu_estimates": est,
            "phase2_s_per_sample": per_sample_p2, "phase2_flops_per_sample": flops_per_sample}


def training_section(model: dict[str, Any], precision: str) -> list[str]:
    peak = model["matmul_peak"]["flops_per_s"]
    lines = [
        "### Training steps",
        "",
        template("benchmarks", "training", precision=precision),
        "",
        "| phase | expert | B per stream | images/step | step (s) | images/s | peak memory (GiB) | above weights (GiB) | GFLOP/step | MFU |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in model["train"]:
        if r.get("oom"):
            lines.append(f"| {PHASE_NAMES[r['phase']]} | {EXPERT_NAMES[r['expert']]} | {r['batch_per_stream']} | | OOM | | | | | |")
            continue
        lines.append(
            f"| {PHASE_NAMES[r['phase']]} | {EXPERT_NAMES[r['expert']]} | {r['batch_per_stream']} | {r['images_per_step']} "
            f"| {_f(r['step_s'], 3)} ({_f(r['step_s_min'], 3)}-{_f(r['step_s_max'], 3)}) | {_f(r['images_per_s'], 2)} "
            f"| {_f(r['peak_gib'])} | {_f(r['above_baseline_gib'])} | {r['flops_per_step'] / 1e9:,.0f} "
            f"| {100 * _mfu(r, peak):.0f}% |")
    for r in model.get("phase3_steps", []):
        lines.append(
            f"| phase 3 | {EXPERT_NAMES['scorer']} (cached outputs) | {r['batch']} | {r['batch']} "
            f"| {_f(1000 * r['step_s'], 2)} ms ({_f(1000 * r['step_s_min'], 2)}-{_f(1000 * r['step_s_max'], 2)}) "
            f"| {_f(r['images_per_s'], 0)} | {_f(r['peak_gib'])} | {_f(r['above_baseline_gib'], 4)} | - | - |")
    lines += ["", template("benchmarks", "training_phase3")
              + (" The phase-3 rows come from a separate run (`--sections phase3`, see Phase 3)."
                 if (model.get("section_runs") or {}).get("phase3") else ""), "", "Trainable parameters:", ""]
    lines += [f"- {v}" for v in model.get("trainable", {}).values()]
    return lines + [""]


def prefix_section(model: dict[str, Any]) -> list[str]:
    lines = [
        "### Prefix reuse versus the plain two-pass computation (phase 2)",
        "",
        template("benchmarks", "prefix"),
        "",
        "| expert | B per stream | prefix reuse (s) | two-pass (s) | time ratio (median, min-max) | FLOP ratio | max abs logit difference |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for pr in model.get("prefix_reuse", []):
        if not pr:
            continue
        r = pr["ratio"]
        lines.append(f"| {EXPERT_NAMES[pr['expert']]} | {pr['batch_per_stream']} | {_f(pr['prefix_reuse_s'], 3)} | "
                     f"{_f(pr['two_pass_s'], 3)} | {r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f}, {r['rounds']} rounds) | "
                     f"{pr['flop_ratio']:.3f} | {pr['max_abs_logit_diff']:.1e} |")
    return lines + [""]


def inference_section(model: dict[str, Any]) -> list[str]:
    inf = model.get("inference")
    if not inf:
        return []
    lines = [
        "### Inference cost per image",
        "",
        template("benchmarks", "inference", batch=inf["batch"]),
        "",
        "| model | ms per image | multiple of plain ViT-B/16 (median, min-max) | FLOP multiple | GFLOP per image |",
        "| --- | ---: | --- | ---: | ---: |",
    ]
    for r in inf["rows"]:
        m = r["multiple"]
        lines.append(f"| {r['name']} | {_f(r['ms_per_image'], 1)} | {m['median']:.2f} ({m['min']:.2f}-{m['max']:.2f}) | "
                     f"{r['flop_multiple']:.2f} | {r['gflops_per_image']:.1f} |")
    lptpp = next((r for r in inf["rows"] if r["name"].startswith("LPT++ mixture, prefix reuse")), None)
    if lptpp is not None:
        lines += ["", tta_cost_sentence(lptpp["multiple"]["median"])]
    return lines + [""]


def tta_cost_sentence(passes: float) -> str:
    """The cost of test-time augmentation: every view is one more run of both experts."""
    from lpt_lightning.data.transforms import TEST_TIME_VIEWS

    costs = ", ".join(f"`{name}` {views} views = {views * passes:.2f}" for name, views in TEST_TIME_VIEWS.items()
                      if views > 1)
    return (f"Test-time augmentation (`data.test_time.augment`) runs both experts on every view of an image, so "
            f"LPT++ costs its {passes:.2f} passes per image times the views: {costs} passes per image.")


def mfu_section(model: dict[str, Any], machine: dict[str, Any]) -> list[str]:
    mp = model["matmul_peak"]
    lines = [
        "### Model FLOP utilisation (phase 1)",
        "",
        template("benchmarks", "mfu", gflops=f"{mp['flops_per_s'] / 1e9:,.1f}", dtype=mp["dtype"], n=mp["n"],
                 threads=machine.get("torch_threads")),
        "",
        "| phase | expert | B per stream | GFLOP/step | achieved GFLOP/s | probe GFLOP/s | MFU (median, min-max) | vs start-of-run peak |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in model["train"]:
        if r.get("oom"):
            continue
        m = r.get("mfu_paired")
        cell = f"{100 * m['median']:.0f}% ({100 * m['min']:.0f}-{100 * m['max']:.0f}%)" if m else "n/a"
        lines.append(f"| {PHASE_NAMES[r['phase']]} | {EXPERT_NAMES[r['expert']]} | {r['batch_per_stream']} | "
                     f"{r['flops_per_step'] / 1e9:,.0f} | {r['achieved_flops_per_s'] / 1e9:,.1f} | "
                     f"{_f(r.get('probe_flops_per_s', float('nan')) / 1e9, 1)} | {cell} | "
                     f"{100 * r['achieved_flops_per_s'] / mp['flops_per_s']:.0f}% |")
    return lines + ["", "Phase-2 rows are included for comparison (the issue's MFU figure is phase 1).", ""]


def cost_section(model: dict[str, Any]) -> list[str]:
    rows = model.get("cost_growth")
    if not rows:
        return []
    p1 = _largest(model, "phase1", "visual")
    per_image = p1["step_s"] / p1["images_per_step"] if p1 else None
    lines = [
        "### Cost growth of head + loss with the number of classes",
        "",
        template("benchmarks", "cost", batch=rows[0]["batch"])
        + (" CPU: 1 torch thread (small tensors; see phase 3)." if model.get("small_op_threads") else "")
        + " The last column compares with a phase-1 step of "
        f"the same {rows[0]['batch']} images"
        + (", extrapolated linearly from the largest measured phase-1 batch" if p1 and p1["images_per_step"] < rows[0]["batch"] else "")
        + ".",
        "",
        "| classes | head + loss step (ms) | head state (MiB) | step peak above state (MiB) | share of a phase-1 step |",
        "| ---: | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        share = r["step_s"] / (per_image * r["batch"]) if per_image else None
        lines.append(f"| {r['classes']:,} | {_f(1000 * r['step_s'], 2)} ({_f(1000 * r['step_s_min'], 2)}-{_f(1000 * r['step_s_max'], 2)}) "
                     f"| {_f(r['state_mib'], 1)} | {_f(r['peak_above_baseline_mib'], 1)} | "
                     f"{_f(100 * share, 2) + '%' if share is not None else 'n/a'} |")
    first, last = rows[0], rows[-1]
    lines += ["", f"From {first['classes']:,} to {last['classes']:,} classes ({last['classes'] / first['classes']:.1f}x) the "
              f"head + loss step grows {last['step_s'] / first['step_s']:.1f}x in time and the head state "
              f"{last['state_mib'] / first['state_mib']:.1f}x in memory.", ""]
    return lines


def phase3_section(model: dict[str, Any], machine: dict[str, Any]) -> list[str]:
    epoch = model.get("phase3_epoch")
    if not epoch:
        return []
    share = scorer_share(model)
    lpp = _inference(model, "LPT++ mixture, prefix reuse")
    epochs = [e for e in (epoch, model.get("phase3_epoch_large_batch")) if e]
    record = (model.get("section_runs") or {}).get("phase3")
    lines = [
        "### Phase 3: scorer epoch on cached outputs versus recomputing them",
        "",
        template("benchmarks", "phase3", rows=f"{epoch['samples']:,}", epochs=len(epoch.get("epochs_s", [None])))
        + (" On the CPU the phase-3 and cost-growth sections run with 1 torch thread: with 2 OpenMP threads on 2 "
           "shared cores, tiny ops wait for a descheduled sibling thread and their times swing 10-50x."
           if model.get("small_op_threads") else ""),
        "",
    ]
    if record:
        lines += [f"Phase-3 figures (rerun on their own, `--sections phase3`): {_measured_line(record)}"
                  + (" **Another CPU than the other figures** here, so the shares of a phase-2 epoch below compare two "
                     "machines." if record.get("machine", {}).get("cpu") != machine.get("cpu") else ""), ""]
    lines += ["| per training sample (us) | " + " | ".join(f"batch {e['batch']}" for e in epochs) + " |",
              "| --- |" + " ---: |" * len(epochs)]
    bares = [_bare_step(model, e["batch"]) for e in epochs]
    rows = [("scorer epoch through `Trainer.fit`, best epoch", lambda e, b: e["s_per_sample"]),
            ("of which inside the training step (forward, logging, backward, AdamW, Lightning's wrapping)",
             lambda e, b: e.get("in_step_s_per_sample")),
            ("of which between steps (sampler, batch read, loop)", lambda e, b: e.get("between_steps_s_per_sample")),
            ("bare `training_step` + backward + AdamW, `self.log` stubbed: best (median)",
             lambda e, b: b and (b["step_s_min"] / b["batch"], b["step_s"] / b["batch"])),
            ("batch read alone, `CachedOutputsDataset.__getitems__`: best (median)",
             lambda e, b: b and "read_s" in b and (b["read_s_min"] / b["batch"], b["read_s"] / b["batch"]))]
    for label, value in rows:
        cells = []
        for e, b in zip(epochs, bares):
            v = value(e, b)
            cells.append(f"{1e6 * v[0]:.1f} ({1e6 * v[1]:.1f})" if isinstance(v, tuple)
                         else "-" if not v else f"{1e6 * v:.1f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    if share:
        p2 = share["phase2_s_per_sample"]
        lines += ["| per training sample | seconds | relative to a phase-2 epoch |", "| --- | ---: | ---: |",
                  f"| phase-2 epoch, visual expert (one step of 2B images per B samples) | {p2:.3g} | 100% |"]
        for e in epochs:
            configs = " (the configs')" if e is epoch else ""
            lines.append(f"| scorer epoch, cached outputs, batch {e['batch']}{configs} | {e['s_per_sample']:.3g} | "
                         f"{100 * e['s_per_sample'] / p2:.4f}% |")
        if lpp:
            recompute = lpp["ms_per_image"] / 1000 + epoch["s_per_sample"]
            lines.append(f"| scorer epoch recomputing both experts' outputs (LPT++ forward per image + scorer) | "
                         f"{recompute:.3g} | {100 * recompute / p2:.1f}% |")
        lines += [
            "",
            template("benchmarks", "phase3_caching", times=f"{recompute / epoch['s_per_sample']:,.0f}") if lpp else "",
            "",
            template("benchmarks", "phase3_gpu", overheads=", ".join(
                f"{1e6 * _loop_overhead(model, e):.0f} us at batch {e['batch']}" for e in epochs),
                mfu=f"{ASSUMED_GPU_MFU:.0%}", gflops=f"{share['phase2_flops_per_sample'] / 1e9:.0f}",
                estimates="; ".join(
                    f"batch {b}: " + ", ".join(f"{gpu} ~{100 * v:.1f}%" for gpu, v in per_gpu.items())
                    for b, per_gpu in share["gpu_estimates"].items())),
        ]
    return lines + [""]


def _measured_line(record: dict[str, Any]) -> str:
    """Command, date, duration, CPU and load of one run record (a part rerun with `--only` has its own)."""
    m = record.get("machine", {})
    return (f"Command `{record.get('command')}`, {record.get('date')}, {record.get('seconds', float('nan')) / 60:.1f} min, "
            f"on {m.get('cpu')} ({m.get('cpu_cores_visible')} cores, shared with other jobs; load average "
            f"{_f(record.get('load_average_start'), 1)} at the start, {_f(record.get('load_average_end'), 1)} at the end).")


def _copies(data: dict[str, Any]) -> list[str]:
    """The copies of the data set measured, in order (per-worker keys are "copy | pipeline")."""
    return list(dict.fromkeys(name.split(" | ")[0] for name in data.get("per_worker", {})))


def _best_rate(data: dict[str, Any], copy: str, pipeline: str) -> float | None:
    r = data.get("per_worker", {}).get(f"{copy} | {pipeline}")
    return r["images_per_s_best"] if r else None


def _is_prepared_default(copy: str) -> bool:
    """A copy `lpt prepare` writes with its defaults (short side 256): the goal's "prepared data"."""
    return copy.startswith(("resized tree", "LitData shards (")) and "224" not in copy


def gpu_demand(model: dict[str, Any]) -> list[dict[str, Any]]:
    """Images/s one PROJECTION_GPU consumes at ASSUMED_GPU_MFU, per phase and expert, from the FLOPs
    counted in the model benchmarks (training steps: forward + backward; phase 3's outputs pass: both
    experts' inference forward, one pass over each image)."""
    peak, rows = GPU_PEAKS[PROJECTION_GPU] * ASSUMED_GPU_MFU, []
    for phase in ("phase1", "phase2"):
        for expert in ("visual", "vl"):
            r = _largest(model, phase, expert)
            if r:
                flops = r["flops_per_step"] / r["images_per_step"]
                rows.append({"phase": PHASE_NAMES[phase], "what": f"{EXPERT_NAMES[expert]}, training step",
                             "transform": "train", "flops_per_image": flops, "images_per_s": peak / flops})
    both = _inference(model, "LPT++ mixture, prefix reuse")
    if both:
        flops = both["gflops_per_image"] * 1e9
        rows.append({"phase": "phase 3, outputs pass", "what": "both experts' forward (one pass computes both)",
                     "transform": "eval", "flops_per_image": flops, "images_per_s": peak / flops})
    return rows


def projection(data: dict[str, Any], model: dict[str, Any]) -> dict[str, Any] | None:
    """Supply of a NODE_CORES-core node (NODE_WORKERS workers x best per-worker rate) against the
    GPU demand of each phase, and the phase-2 goal."""
    demand, copies = gpu_demand(model), _copies(data)
    if not demand or not copies:
        return None
    rows = []
    for d in demand:
        rates = {c: _best_rate(data, c, d["transform"]) for c in copies}
        supply = {c: NODE_WORKERS * r for c, r in rates.items() if r}
        prepared = max((v for c, v in supply.items() if _is_prepared_default(c)), default=None)
        rows.append(d | {"supply": supply, "rates": rates, "prepared_supply": prepared})
    phase2 = [r for r in rows if r["phase"] == PHASE_NAMES["phase2"]]
    goal = None
    if phase2 and phase2[0]["prepared_supply"]:
        need = max(r["images_per_s"] for r in phase2)
        best_copy = max((c for c in copies if _is_prepared_default(c)),
                        key=lambda c: phase2[0]["supply"].get(c, 0.0))
        supply = phase2[0]["supply"][best_copy]
        median = data["per_worker"][f"{best_copy} | train"]["images_per_s"]
        goal = {"demand": need, "supply": supply, "copy": best_copy, "met": supply >= need,
                "supply_median": NODE_WORKERS * median, "per_worker_needed": need / NODE_WORKERS,
                "workers_needed": need / phase2[0]["rates"][best_copy]}
    return {"rows": rows, "copies": copies, "goal": goal}


def data_section(run: dict[str, Any]) -> list[str]:
    data, model = run.get("data"), run.get("model") or {}
    if not data or "cost" not in data:
        return []
    record = data.get("run") or run
    n, rounds = data["n_images"], next(iter(data["per_worker"].values()))["rounds"]
    lines = [
        "### Data loading",
        "",
        template("benchmarks", "training_loader"),
        "",
        _measured_line(record)
        + f" {n} photo-like 800x600 JPEGs (iNaturalist-sized originals: natural images upscaled plus sensor-like "
        f"noise, quality 90, {data['kib_raw']:.1f} KiB on average), all in the page cache.",
        "",
        template("benchmarks", "no_gpu"),
        "",
        "#### `lpt prepare`: cost per 10,000 images",
        "",
        template("benchmarks", "prepare_cost", n=n, rounds=data["cost"][0]["rounds"]),
        "",
        ("| format | processes | shorter side | seconds for the set, best (median) | seconds per 10,000 images | "
        "KiB per stored image |"),
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in data["cost"]:
        lines.append(f"| {r['format']} | {r['processes']} | {r['short_side']} | {r['seconds']:.1f} "
                     f"({r['seconds_median']:.1f}) | {r['seconds_per_10k']:,.0f} | {r['kib_per_image']:.1f} |")
    lines += [
        "",
        "#### Images/s per worker",
        "",
        template("benchmarks", "per_worker", batch=data["batch_per_stream"], eval_batch=data["eval_batch"],
                 images=data["worker_images_per_round"], rounds=rounds),
        "",
        "| copy | pipeline | images/s per worker, best | median | ms per image, best |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for name, r in data["per_worker"].items():
        copy, pipeline = name.split(" | ")
        lines.append(f"| {copy} | {pipeline} | {r['images_per_s_best']:,.0f} | {r['images_per_s']:,.0f} | "
                     f"{r['ms_per_image_best']:.2f} |")
    loader_rounds = data["loaders"][0]["rounds"] if data["loaders"] else 0
    lines += [
        "",
        "#### The real loaders with 1 and 2 workers",
        "",
        template("benchmarks", "loaders", batch=data["batch_per_stream"], steps=n // data["batch_per_stream"],
                 eval_batch=data["eval_batch"], rounds=loader_rounds,
                 cores=record.get("machine", {}).get("cpu_cores_visible")),
        "",
        "| copy | loader | workers | images/s, best | median |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in data["loaders"]:
        lines.append(f"| {r['copy']} | {r['loader']} | {r['workers']} | {r['images_per_s_best']:,.0f} | "
                     f"{r['images_per_s']:,.0f} |")
    lines += [""] + projection_section(data, model) + [template("benchmarks", "prepared_format"), ""]
    return lines


def projection_section(data: dict[str, Any], model: dict[str, Any]) -> list[str]:
    proj = projection(data, model)
    if not proj:
        return []
    copies = proj["copies"]
    lines = [
        f"#### Projection: a {NODE_CORES}-core node against one {PROJECTION_GPU.split(' (')[0]}",
        "",
        template("benchmarks", "projection", gpu=PROJECTION_GPU, mfu=f"{ASSUMED_GPU_MFU:.0%}", workers=NODE_WORKERS,
                 cores=NODE_CORES),
        "",
        "| phase | model | GFLOP per image | GPU demand (images/s) | "
        + " | ".join(f"supply: {c}" for c in copies) + " | workers needed (best prepared copy) | met from prepared data |",
        "| --- | --- | ---: | ---: | " + " | ".join("---:" for _ in copies) + " | ---: | --- |",
    ]
    for r in proj["rows"]:
        prepared = [c for c in copies if _is_prepared_default(c) and r["rates"].get(c)]
        best = max(prepared, key=lambda c: r["rates"][c]) if prepared else None
        need = f"{r['images_per_s'] / r['rates'][best]:.0f}" if best else "n/a"
        met = ("yes" if r["prepared_supply"] >= r["images_per_s"] else "**no**") if r["prepared_supply"] else "n/a"
        lines.append(f"| {r['phase']} | {r['what']} | {r['flops_per_image'] / 1e9:.1f} | {r['images_per_s']:,.0f} | "
                     + " | ".join(_f(r["supply"].get(c), 0) for c in copies) + f" | {need} | {met} |")
    goal = proj["goal"]
    if goal:
        lines += ["", _goal_text(goal, data, proj)]
        raw = next((c for c in copies if c.startswith("raw")), None)
        phase2 = next(r for r in proj["rows"] if r["phase"] == PHASE_NAMES["phase2"])
        if raw and raw in phase2["supply"]:
            lines[-1] += (f" From the raw originals the same node supplies {phase2['supply'][raw]:,.0f} images/s "
                          f"({100 * phase2['supply'][raw] / goal['demand']:.0f}% of the demand)"
                          + (": preparing the data is what meets the goal." if goal["met"] else "."))
    return lines + [""]


def _goal_text(goal: dict[str, Any], data: dict[str, Any], proj: dict[str, Any]) -> str:
    head = (f"**Goal: a {NODE_CORES}-core node feeds one H100 in phase 2 (about 6,000 images/s) from prepared "
            f"data.** Projected: {goal['supply']:,.0f} images/s ({goal['copy']}, {NODE_WORKERS} x "
            f"{goal['supply'] / NODE_WORKERS:,.0f}) against a demand of {goal['demand']:,.0f}")
    if goal["met"]:
        return head + (f": **met** on this projection (x{goal['supply'] / goal['demand']:.2f}; with the median "
                       f"rounds instead of the best, {goal['supply_median']:,.0f}, "
                       f"x{goal['supply_median'] / goal['demand']:.2f}). Caveats: the images are photo-like stand-ins "
                       "(natural images upscaled plus noise), not iNaturalist photos, whose prepared files may be "
                       "larger and slower to decode; a slower or busier node core shrinks the margin; none of it was "
                       "measured on a GPU node.")
    text = (head + f": **not met**: {goal['demand'] - goal['supply']:,.0f} images/s short (supply "
            f"{100 * goal['supply'] / goal['demand']:.0f}% of demand). At this per-worker rate it needs "
            f"{goal['workers_needed']:.0f} workers ({math.ceil(goal['workers_needed']) + 1} cores per GPU), or "
            f"{goal['per_worker_needed']:,.0f} images/s per worker on {NODE_WORKERS}. What would close the gap:")
    options = []
    tree = next((c for c in proj["copies"] if c.startswith("resized tree")), None)
    device_side = _best_rate(data, tree, "train, data.decode_jpeg_on_device (worker side)") if tree else None
    if device_side:
        options.append(f"`data.decode_jpeg_on_device: true` with the resized tree: a worker then only reads bytes "
                       f"({device_side:,.0f} images/s measured, {NODE_WORKERS} x = {NODE_WORKERS * device_side:,.0f}), "
                       "and decoding + cropping move to nvjpeg on the GPU, whose throughput and share of the GPU's "
                       "time were not measured (no GPU lent)")
    small = next((c for c in proj["copies"] if "224" in c), None)
    small_rate = _best_rate(data, small, "train") if small else None
    if small_rate:
        options.append(f"a lower `lpt prepare --short_side` (224: {small_rate:,.0f} images/s per worker, "
                       f"{NODE_WORKERS} x = {NODE_WORKERS * small_rate:,.0f}; RandomResizedCrop and the eval "
                       "Resize(256, 256) then upsample from fewer pixels, accuracy effect not measured)")
    options.append("NVIDIA DALI (GPU decode and augmentation in one pipeline; not measured, not a dependency of "
                   "lpt_lightning)")
    options.append("more or faster cores per GPU (not measured)")
    return text + " " + "; ".join(options) + "."


def findings(run: dict[str, Any]) -> list[str]:
    """Bottlenecks in lpt_lightning that the figures above expose, with before/after numbers."""
    model = run.get("model") or {}
    lines = ["### Bottlenecks found in our code, with before/after figures", ""]
    # 1. compute on discarded tokens (fixed during this issue)
    if model.get("inference"):
        ex = model.get("before_fix_exactness", {})
        lines += [
            template("benchmarks", "finding_1", logits=f"{ex.get('logits', float('nan')):.1e}",
                     grad=f"{ex.get('grad', float('nan')):.1e}", vit_logits=", ".join(
                         f"{k} {v:.1e}" for k, v in model["inference"].get("before_fix_max_abs_logit_diff", {}).items()
                     )),
            "",
            "| measurement | before the fix | after (library now) | after / before |",
            "| --- | ---: | ---: | ---: |",
        ]
        for before, after, label in (("LPT, before the kept-token fix", "LPT, prefix reuse", "LPT inference, x plain ViT-B/16"),
                                     ("LPT++ mixture, before the kept-token fix", "LPT++ mixture, prefix reuse",
                                      "LPT++ inference, x plain ViT-B/16")):
            b, a = _inference(model, before), _inference(model, after)
            if a and b:
                lines.append(f"| {label}: time (FLOPs) | {b['multiple']['median']:.2f} ({b['flop_multiple']:.2f}) | "
                             f"{a['multiple']['median']:.2f} ({a['flop_multiple']:.2f}) | "
                             f"{a['multiple']['median'] / b['multiple']['median']:.3f} |")
        for r in model.get("before_fix_phase1", []) or []:
            if r:
                lines.append(f"| phase-1 step, {EXPERT_NAMES[r['expert']]}, B = {r['batch_per_stream']} x 2: s (GFLOP) | "
                             f"{r['before_s']:.3f} ({r['before_flops'] / 1e9:.0f}) | {r['library_s']:.3f} "
                             f"({r['library_flops'] / 1e9:.0f}) | {r['ratio']['median']:.3f} (paired) |")
        for r in model.get("prefix_reuse", []) or []:
            if r and "before_s" in r:
                lines.append(f"| phase-2 step, {EXPERT_NAMES[r['expert']]}, B = {r['batch_per_stream']} x 2: s (GFLOP) | "
                             f"{r['before_s']:.3f} ({r['before_flops'] / 1e9:.0f}) | {r['prefix_reuse_s']:.3f} "
                             f"({r['library_flops'] / 1e9:.0f}) | {r['library_vs_before']['median']:.3f} (paired) |")
        ap = model.get("attention_paths")
        if ap:
            lines += ["", template("benchmarks", "attention_paths", batch=ap["batch"], tokens=ap["tokens"],
                                   diff=f"{ap['max_abs_diff']:.1e}"), "",
                      "| block | ms | x timm block (median, min-max) |", "| --- | ---: | --- |"]
            for r in ap["rows"]:
                v = r["vs_timm"]
                lines.append(f"| {r['name']} | {r['ms']:.1f} | {v['median']:.2f} ({v['min']:.2f}-{v['max']:.2f}) |")
            lines += ["", template("benchmarks", "attention_paths_left")]
        lines.append("")
    # 2. data hand-off (fixed)
    lines += [
        template("benchmarks", "finding_2"), ""]
    # 3. phase-3 expert outputs at scale (addressed)
    lines += [
        template("benchmarks", "finding_3"),
        "",
        "| dataset | classes | held-out (val) | test | total | `fit_on: train` adds |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    gib = 2.0 ** 30
    for name, classes, n_train, n_val, carved, n_test in (
            ("Places-LT", 365, 62_500, 7_300, False, 36_500),
            ("ImageNet-LT", 1_000, 115_846, 20_000, False, 50_000),
            ("iNaturalist 2018", 8_142, 437_513, 8_142 * 5, True, 24_426)):
        full_row = 16 + (768 + 512) * 2 + 2 * classes * 2
        train = n_train * (16 + (768 + 512) * 2 + 2 * 4) / gib
        val, test = n_val * full_row / gib, n_test * full_row / gib
        held = f"{'<= ' if carved else ''}{val:.2f} GiB{' (carved, 5/class)' if carved else ''}"
        lines.append(f"| {name} | {classes:,} | {held} | {test:.2f} GiB | {'<= ' if carved else ''}{val + test:.2f} GiB "
                     f"| {train:.2f} GiB |")
    lines.append("")
    # 4. phase-3 per-sample overhead
    epoch = model.get("phase3_epoch")
    steps = model.get("phase3_steps") or []
    if epoch and steps:
        bare = _bare_step(model, epoch["batch"]) or steps[0]
        us = {k: 1e6 * epoch[k] for k in ("s_per_sample", "in_step_s_per_sample", "between_steps_s_per_sample")
              if k in epoch}
        small, large = steps[0], steps[-1]
        # Bare step time = fixed per step + per sample (a line through the smallest and largest batch, best times).
        per_sample = (large["step_s_min"] - small["step_s_min"]) / (large["batch"] - small["batch"])
        fixed = small["step_s_min"] - per_sample * small["batch"]
        big = model.get("phase3_epoch_large_batch")
        lines += [
            template("benchmarks", "finding_4", batch=epoch["batch"], epoch_us=f"{us['s_per_sample']:.1f}",
                     in_step=f"{us.get('in_step_s_per_sample', float('nan')):.1f}",
                     between=f"{us.get('between_steps_s_per_sample', float('nan')):.1f}",
                     bare=f"{1e6 * bare['step_s_min'] / bare['batch']:.1f}",
                     wrap=f"{us.get('in_step_s_per_sample', 0) - 1e6 * bare['step_s_min'] / bare['batch']:.0f}",
                     fixed=f"{1000 * fixed:.1f}", per_sample=f"{1e6 * per_sample:.0f}",
                     read=f"{1e6 * bare.get('read_s_min', float('nan')) / bare['batch']:.1f}",
                     large=f"at batch {big['batch']} an epoch costs {1e6 * big['s_per_sample']:.1f} us per sample "
                           "(`phase3.data.batch_size`; the cached rows make a large batch free). " if big else ""), ""]
    lines += [
        template("benchmarks", "finding_5"), ""]
    return lines


def text_encoding_section(results: Path) -> list[str]:
    """The VL head's text initialisation at iNaturalist's class count (`bench_text_encoding`)."""
    path = results / "text_encoding.json"
    if not path.is_file():
        return []
    r = json.loads(path.read_text())
    before, after, cached = r["before"], r["after"], r.get("cached")
    n = before["names"]
    scale = INAT_CLASSES / n

    def extra(row: dict[str, Any]) -> float:
        return row["peak_rss_gb"] - row["rss_built_gb"]

    lines = [
        f"### Text initialisation of the VL head: {INAT_CLASSES:,} class names (iNaturalist 2018)", "",
        template("benchmarks", "text_encoding", command=before["command"], date=before["date"], torch=r["torch"],
                 threads=r["threads"], cores=r["cpu_cores"], load=_f(after["load_average_end"], 1),
                 built=_f(before["rss_built_gb"], 2), classes=f"{INAT_CLASSES:,}", n=f"{n:,}",
                 minutes=f"{before['seconds'] * scale / 60:.0f}"), "",
        f"| encoding | batch | {n:,} names: time | peak RSS | {INAT_CLASSES:,} names: time (extrapolated) "
        "| peak RSS (extrapolated) |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| before: one batch, on every rank | all | {before['seconds']:.0f} s | "
        f"{before['peak_rss_gb']:.2f} GB | {before['seconds'] * scale / 60:.0f} min | "
        f"{before['rss_built_gb'] + extra(before) * scale:.1f} GB |",
        f"| after: batches of 256, once | 256 | {after['seconds']:.0f} s | {after['peak_rss_gb']:.2f} GB | "
        f"{after['seconds'] * scale / 60:.0f} min | {after['peak_rss_gb']:.2f} GB |",
    ]
    if cached:
        lines.append(f"| after: every other process (cache hit) | - | - | - | {cached['digest_seconds'] + cached['read_seconds']:.1f} s "
                     f"(tower digest {cached['digest_seconds']:.1f} s, reading {cached['file_mb']:.0f} MB "
                     f"{cached['read_seconds']:.2f} s) | {cached['peak_rss_gb']:.2f} GB |")
    lines += [
        "",
        template("benchmarks", "text_encoding_batching", extra_before=f"{extra(before):.1f}", n=f"{n:,}",
                 extra_after=f"{extra(after):.1f}", after=f"{after['seconds']:.0f}", before=f"{before['seconds']:.0f}"),
        "",
    ]
    return lines


def _gpu_checks(results: Path) -> list[dict[str, Any]]:
    checks = [json.loads(p.read_text()) for p in sorted(results.glob("bench_*.json"))]
    return [c for c in checks if c.get("kind") == "gpu_check"]


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def gpu_check_section(check: dict[str, Any]) -> list[str]:
    """The section of one `python benchmarks/gpu_check.py` run (sections it did not reach are absent)."""
    m = check["machine"]
    where = m.get("gpu") or f"{m['cpu']} (dry run: tiny shapes, not GPU figures)"
    lines = [f"## GPU check: {where}, {m['precision']}", "",
             template("benchmarks", "gpu_check", command=check["command"], date=check["date"],
                      minutes=f"{check['seconds'] / 60:.1f}", torch=m["torch"]), ""]
    train = check.get("train")
    if train:
        peak = train["peak_flops_per_s"]
        lines += [f"MFU against {_f(peak / 1e9, 0) + ' GFLOP/s' if peak else 'n/a'} "
                  f"({train['peak_source'] or train['peak_note']}).", "",
                  "| images per step | mode | images/s | step (ms) | MFU | peak memory (GiB) | first step (s) |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in train["rows"]:
            lines.append(f"| {r['images_per_step']} | {r['mode']}{' (' + r['compile_backend'] + ')' if r.get('compile_backend') else ''} "
                         f"| {_f(r['images_per_s'], 0)} | {_f(1000 * r['step_s'], 1)} | {_pct(r['mfu'])} "
                         f"| {_f(r.get('peak_gib'))} | {_f(r.get('first_step_s'), 1)} |")
        inf = train["inference"]
        lines += ["", f"Inference (`LongTailExpert.forward`, batch {inf['batch']}): {_f(inf['images_per_s'], 0)} "
                      f"images/s, peak memory {_f(inf['peak_gib'])} GiB.", ""]
    run = check.get("run_200")
    if run:
        lines += [f"{run['steps']} phase-2 steps in {run['precision']} on synthetic data ({run['num_classes']} classes, "
                  f"{run['images_per_step']} images per step): loss {run['loss_first_20']:.3f} over the first 20 steps, "
                  f"{run['loss_last_20']:.3f} over the last 20: "
                  f"{'went down' if run['loss_went_down'] else '**did not go down**'} ({run['seconds']:.0f} s).", ""]
    loader = check.get("loader")
    if loader:
        dd = loader["device_decode"]
        lines += [template("benchmarks", "gpu_check_loader", batch=loader["batch_per_stream"], pin=loader["pin_memory"],
                           workers=loader["workers"], items=f"{loader['items']:,}", rate=_f(loader["images_per_s"], 0),
                           where=dd["where"], device_rate=_f(dd["images_per_s"], 0)), ""]
    return lines


def feed_section(feed: dict[str, Any]) -> list[str]:
    """benchmarks/bench_feed.py: CPU cost per training image, stage by stage, and cores for one H100."""
    m = feed["machine"]
    lines = ["## Feeding the GPU: CPU cost per training image", "",
             template("benchmarks", "feed", quick=" --quick" if feed["quick"] else "", date=feed["date"], cpu=m["cpu"],
                      load=_f(feed.get("load_average"), 1), images=feed["images"], rounds=feed["rounds"]), "",
             "| stage | ms per image, best | median |", "| --- | ---: | ---: |"]
    for r in feed["rows"]:
        lines.append(f"| {r['stage']} | {r['ms_per_image_best']:.3f} | {r['ms_per_image']:.3f} |")
    lines += ["", template("benchmarks", "feed_total", sum=f"{feed['stage_sum_ms']:.2f}",
                           item=f"{feed['whole_item_ms']:.2f}",
                           used=f"{feed['cost_ms_used']:.2f}", target=f"{feed['target_images_per_s']:,}",
                           cores=f"{feed['cores_for_target']:.1f}"), ""]
    return lines


def dry_run_section(results: Path) -> list[str]:
    """Every shipped GPU entry point run (pipelines) or built (phase configs) on the CPU at the real
    architectures and class counts (`benchmarks/dry_run.py`)."""
    path = results / "dry_run.json"
    if not path.is_file():
        return []
    r = json.loads(path.read_text())
    entries = r["entries"]
    threads = f"{r['threads']} torch thread" + ("s" if (r["threads"] or 0) > 1 else "") if r["threads"] else "default threads"
    lines = [
        "### Dry run of the GPU entry points", "",
        template("benchmarks", "dry_run", commands=", then ".join(f"`{c}`" for c in r["commands"]), date=r["date"],
                 torch=r["torch"], threads=threads, cores=r["cpu_cores"], load=_f(r["load_average_end"], 1),
                 batch=r["batch_size"], limit=r["limit_batches"], epochs1=r["epochs"]["phase1"],
                 epochs3=r["epochs"]["phase3"], encode_max=f"{r['encode_text_max']:,}")
        + (f" {r['note']}" if r.get("note") else ""), "",
        "| entry point | classes | run | wall time | peak RSS | result |",
        "| --- | ---: | --- | ---: | ---: | --- |",
    ]
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1]["classes"], kv[1]["kind"] != "pipeline", kv[0])):
        lines.append(f"| `{name}` | {e['classes']:,} | {e['what']} | {e['seconds']:.0f} s | {e['peak_rss_gb']:.2f} GB "
                     f"| {'passed' if e['ok'] else '**failed** (exit ' + str(e['exit_code']) + ')'} |")
    lines += ["", template("benchmarks", "dry_run_end"), ""]
    return lines


def render(results: Path) -> str:
    runs = _load(results)
    lines = [template("benchmarks", "intro"), ""]
    checks = _gpu_checks(results)
    if not runs and not checks:
        lines.append("No results yet: run `make bench`.")
    for run in runs:
        m = run["machine"]
        where = m.get("gpu") or m["cpu"]
        title = f"## {'GPU' if m['device'].startswith('cuda') else 'CPU'}: {where}, {m['precision']}"
        lines += [title, ""]
        if m["device"] == "cpu":
            lines += [template("benchmarks", "cpu_note", cores=m["cpu_cores_visible"], cpu=m["cpu"],
                               threads=m["torch_threads"], plural="s" if m["torch_threads"] != 1 else "",
                               load_start=_f(run.get("load_average_start"), 1),
                               load_end=_f(run.get("load_average_end"), 1)), ""]
        if run.get("quick"):
            lines += ["**Quick mode** (`--quick`): fewer batch sizes and rounds; a smoke run, not the reference figures.", ""]
        lines += [f"Command `{run['command']}`, {run['date']}, {run['seconds'] / 60:.1f} min; torch {m['torch']}, "
                  f"timm {m.get('timm')}, open_clip {m.get('open_clip')}.", ""]
        model = run.get("model")
        lines += ["### Summary", ""] + summary(run)
        if model and model.get("run"):  # rerun on its own (`--only model`)
            lines += [f"Model figures: {_measured_line(model['run'])}", ""]
        if model:
            lines += training_section(model, m["precision"]) + prefix_section(model) + inference_section(model)
            lines += mfu_section(model, m) + cost_section(model) + phase3_section(model, m)
        lines += data_section(run)
        lines += findings(run)
    lines += text_encoding_section(results)
    lines += [template("benchmarks", "fast_path"), ""]
    feed = results / "feed_cpu.json"
    if feed.is_file():
        lines += feed_section(json.loads(feed.read_text()))
    for check in checks:
        lines += gpu_check_section(check)
    lines += dry_run_section(results)
    return "\n".join(lines).rstrip() + "\n"


def pages() -> dict[str, Callable[[], str]]:
    """Each generated page (relative to the repository) and the function that renders it."""
    from benchmarks import accuracy_study, demo

    return {"docs/benchmarks.md": lambda: render(REPO / "benchmarks" / "results"),
            "docs/results.md": accuracy_study.render_page,
            "README.md": lambda: demo.render_readme((REPO / "README.md").read_text(),
                                                    json.loads(demo.DEMO.read_text()))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--render", action="store_true", help="rewrite the generated pages from the stored results")
    parser.add_argument("--store-demo", type=Path, metavar="RUN_DIR",
                        help="store a finished demo (its run directory's metrics.json) in benchmarks/results/demo.json")
    parser.add_argument("--seconds", type=float, help="--store-demo: the demo's measured wall time (default: "
                                                      "read from the run directory's file times)")
    args = parser.parse_args(argv)
    if not (args.render or args.store_demo):
        parser.error("nothing to do: pass --render or --store-demo RUN_DIR")
    if args.store_demo:
        from benchmarks import demo

        demo.store_demo(args.store_demo, args.seconds)
    for page, rendering in pages().items():
        (REPO / page).write_text(rendering())
        print(f"wrote {page}")


if __name__ == "__main__":
    main()
