"""Render docs/benchmarks.md from benchmarks/results/bench_*.json."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# Reference GPU peaks (dense bf16, vendor data sheets) for the *estimates* of how fast a GPU would
# consume images; a --device cuda run replaces them with measurements.
GPU_PEAKS = {"A100 (312 TFLOP/s bf16)": 312e12, "H100 SXM (989 TFLOP/s bf16)": 989e12}
ASSUMED_GPU_MFU = 0.40
PHASE_NAMES = {"phase1": "phase 1", "phase2": "phase 2", "phase3": "phase 3"}
EXPERT_NAMES = {"visual": "visual (timm ViT-B/16)", "vl": "VL (CLIP ViT-B/16)", "scorer": "MoE scorer"}


def _f(x: float | None, nd: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:,.{nd}f}"


def _ok(value: float, target: float) -> str:
    return "yes" if value <= target else "**no**"


def _load(results: Path) -> list[dict[str, Any]]:
    """Full runs per device; a quick run only where no full run of that device exists."""
    runs = {}
    for path in sorted(results.glob("bench_*.json")):
        data = json.loads(path.read_text())
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


def _phase2_epoch_s_per_sample(model: dict[str, Any], expert: str) -> float | None:
    """A dual-sampling epoch has N/B steps of 2B images: seconds per training sample = t(B) / B."""
    row = _largest(model, "phase2", expert)
    return row["step_s"] / row["batch_per_stream"] if row else None


def _data_rate(data: dict[str, Any], size: str, start: str) -> float | None:
    for name, r in data.get("per_worker", {}).get(size, {}).items():
        if name.startswith(start):
            return r["images_per_s"]
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
    lpp = _inference(model, "LPT++ mixture, prefix reuse")
    lpt = _inference(model, "LPT, prefix reuse")
    if lpp:
        m = lpp["multiple"]
        lines.append(f"| LPT++ inference per image, x one plain ViT-B/16 forward | 4.0 / FLOPs x{lpp['flop_multiple']:.2f} "
                     f"| <= 3.2 | {m['median']:.2f} (rounds {m['min']:.2f}-{m['max']:.2f}) | {_ok(m['median'], 3.2)} |")
    if lpt:
        m = lpt["multiple"]
        lines.append(f"| LPT inference per image, x one plain ViT-B/16 forward | 2.0 / FLOPs x{lpt['flop_multiple']:.2f} "
                     f"| <= 1.65 | {m['median']:.2f} (rounds {m['min']:.2f}-{m['max']:.2f}) | {_ok(m['median'], 1.65)} |")
    for name, naive, target in (("LPT++ mixture, before the kept-token fix", 4.0, 3.2),
                                 ("LPT, before the kept-token fix", 2.0, 1.65)):
        row = _inference(model, name)
        if row:
            m = row["multiple"]
            label = "LPT++" if name.startswith("LPT++") else "LPT"
            lines.append(f"| (before the kept-token fix: {label} inference) | {naive} / FLOPs x{row['flop_multiple']:.2f} "
                         f"| <= {target} | {m['median']:.2f} (rounds {m['min']:.2f}-{m['max']:.2f}) | {_ok(m['median'], target)} |")
    peak = model["matmul_peak"]["flops_per_s"]
    for expert in ("visual", "vl"):
        row = _largest(model, "phase1", expert)
        if row:
            lines.append(f"| phase-1 MFU, {EXPERT_NAMES[expert]}, B = {row['batch_per_stream']} x 2 | - | - | "
                         f"{100 * _mfu(row, peak):.0f}% of the measured fp32 matmul rate | - |")
    share = scorer_share(model)
    if share:
        lines.append(f"| phase-3 scorer epoch / one phase-2 epoch (visual expert), this machine | - | < 2% | "
                     f"{100 * share['this_machine']:.4f}% | {_ok(share['this_machine'], 0.02)} |")
        for batch, per_gpu in share["gpu_estimates"].items():
            for gpu, value in per_gpu.items():
                lines.append(f"| same, **estimate** for {gpu} at {ASSUMED_GPU_MFU:.0%} MFU, scorer batch {batch} "
                             f"(see phase 3) | - | < 2% | ~{100 * value:.1f}% | {_ok(value, 0.02)} |")
    return lines + [""]


def _loop_overhead(model: dict[str, Any], epoch: dict[str, Any] | None) -> float | None:
    """Host-side seconds per sample of a scorer epoch beyond the scorer's own step: Lightning loop,
    sampler, index-only dataset and collation, logging (what a GPU host pays too)."""
    if not epoch:
        return None
    bare = next((r for r in model.get("phase3_steps", []) if r["batch"] == epoch["batch"]), None)
    return max(epoch["s_per_sample"] - (bare["step_s"] / bare["batch"] if bare else 0.0), 0.0)


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
        f"One optimisation step through the phase's own `training_step` ({precision}): both dual-sampling "
        "streams (B class-balanced + B instance-balanced images, one concatenated forward), A-GCL per stream "
        "(+ 0.5 x matching loss in phase 2), backward, SGD over the trainable parameters only. Phase 1 trains "
        "shared prompt + adapters + head; phase 2 (a real `GroupPromptPhase` loaded from the phase-1 "
        "checkpoint) trains group pool + keys + head, with prefix reuse. Head: 365 classes (Places-LT). "
        "Step time: median over rounds after warm-up (min-max in brackets). Peak memory: tensor bytes "
        "(`torch.cuda.max_memory_allocated` on GPU; on CPU a dispatch-mode tracker of live tensor storage), "
        "including the frozen weights. MFU: FLOPs counted by `torch.utils.flop_counter` (matmuls and "
        "attention, forward + backward) per second, over a matmul probe timed in the same rounds (see MFU below).",
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
    lines += ["", "Phase 3's peak memory includes its cached training tensors (62,500 samples); "
              "\"above weights\" is what a step adds on top.", "", "Trainable parameters:", ""]
    lines += [f"- {v}" for v in model.get("trainable", {}).values()]
    return lines + [""]


def prefix_section(model: dict[str, Any]) -> list[str]:
    lines = [
        "### Prefix reuse versus the plain two-pass computation (phase 2)",
        "",
        "Same `GroupPromptPhase.training_step`, same batch, timed alternately in one process: with the "
        "library's prefix reuse (blocks 1..K once, then the query branch without gradient and the "
        "classification branch with the group prompts), and with `LongTailExpert.forward` swapped for the "
        "plain two-pass computation (a full query pass, then a full classification pass from the embedding). "
        "The ratio is the median of per-round ratios. The FLOP ratio is the exact limit for this workload "
        "(the backward through blocks K+1..12 is common to both, which is why it is above 0.75).",
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
        f"Eval mode, `torch.inference_mode`, batch {inf['batch']}, all candidates timed alternately; "
        "multiple = median of per-round ratios to one plain timm ViT-B/16 forward of the same batch. "
        "LPT = the visual expert without adapters (prefix reuse: 1.5 passes); LPT++ = "
        "`MoEScorerPhase.forward` (both experts with prefix reuse + scorer). The naive method runs two "
        "full passes per expert (2.0 and 4.0 plain forwards); the two-pass rows here run that computation "
        "with the library's current blocks. FLOP multiples: prompt tokens add only keys/values and the last "
        "block of each branch computes only CLS, so 1.5 passes cost less than 1.5 plain forwards. The "
        "'before the kept-token fix' rows run the old block computation (see bottleneck 1).",
        "",
        "| model | ms per image | multiple of plain ViT-B/16 (median, min-max) | FLOP multiple | GFLOP per image |",
        "| --- | ---: | --- | ---: | ---: |",
    ]
    for r in inf["rows"]:
        m = r["multiple"]
        lines.append(f"| {r['name']} | {_f(r['ms_per_image'], 1)} | {m['median']:.2f} ({m['min']:.2f}-{m['max']:.2f}) | "
                     f"{r['flop_multiple']:.2f} | {r['gflops_per_image']:.1f} |")
    return lines + [""]


def mfu_section(model: dict[str, Any], machine: dict[str, Any]) -> list[str]:
    mp = model["matmul_peak"]
    lines = [
        "### Model FLOP utilisation (phase 1)",
        "",
        f"Matmul peak of this machine: {mp['flops_per_s'] / 1e9:,.1f} GFLOP/s ({mp['dtype']}, best of square "
        f"matmuls up to n = {mp['n']}, {machine.get('torch_threads')} thread(s)), measured once at the start. "
        "Because load from other jobs comes and goes, MFU is measured as a paired ratio: in every round the "
        "training step and a fixed matmul probe (square matmuls of the same dtype) run back to back, and "
        "MFU = (counted step FLOPs / step time) / (probe FLOPs / probe time), median over rounds. FLOPs are "
        "counted by `torch.utils.flop_counter` (matmuls, convolutions and attention, forward + backward; "
        "the CPU flash-attention and fused multi-head-attention kernels are added to its table).",
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
        f"Cosine head + A-GCL on a batch of {rows[0]['batch']} features (2 streams x 64, the configs' batch): "
        "forward, backward into the features and the head, SGD step. Times alternate between class counts. "
        "State = fp32 head weight + gradient + momentum."
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


def phase3_section(model: dict[str, Any]) -> list[str]:
    epoch = model.get("phase3_epoch")
    if not epoch:
        return []
    share = scorer_share(model)
    lpp = _inference(model, "LPT++ mixture, prefix reuse")
    lines = [
        "### Phase 3: scorer epoch on cached outputs versus recomputing them",
        "",
        f"A scorer epoch measured through Lightning's real loop (`MoEScorerPhase` in `Trainer.fit`, index-only "
        f"batches of {epoch['batch']} from the class-aware sampler, cached-row gather, fused NLL, AdamW, "
        f"logging) over {epoch['samples']:,} cached samples: {epoch['epoch_s']:.2f} s, i.e. "
        f"{1e6 * epoch['s_per_sample']:.1f} us per training sample"
        + (" (on the CPU the phase-3 and cost-growth sections run with 1 torch thread: with 2 OpenMP threads on 2 shared cores, tiny ops wait for a descheduled sibling thread and their times swing 10-50x)." if model.get("small_op_threads") else "."),
        "",
        "| per training sample | seconds | relative to a phase-2 epoch |",
        "| --- | ---: | ---: |",
    ]
    if share:
        p2 = share["phase2_s_per_sample"]
        lines.append(f"| phase-2 epoch, visual expert (one step of 2B images per B samples) | {p2:.3g} | 100% |")
        lines.append(f"| scorer epoch, cached outputs, batch {epoch['batch']} (the configs') | {epoch['s_per_sample']:.3g} | "
                     f"{100 * epoch['s_per_sample'] / p2:.4f}% |")
        big = model.get("phase3_epoch_large_batch")
        if big:
            lines.append(f"| scorer epoch, cached outputs, batch {big['batch']} | {big['s_per_sample']:.3g} | "
                         f"{100 * big['s_per_sample'] / p2:.4f}% |")
        if lpp:
            recompute = lpp["ms_per_image"] / 1000 + epoch["s_per_sample"]
            lines.append(f"| scorer epoch recomputing both experts' outputs (LPT++ forward per image + scorer) | "
                         f"{recompute:.3g} | {100 * recompute / p2:.1f}% |")
        lines += [
            "",
            f"Caching makes a scorer epoch {recompute / epoch['s_per_sample']:,.0f}x cheaper than recomputing the "
            "experts' outputs (computing the cache once costs one LPT++ inference pass over the training and "
            "held-out images)." if lpp else "",
            "",
            "On this CPU the phase-2 epoch is so slow that the share is tiny. A GPU makes the phase-2 epoch "
            "hundreds of times faster but not the host-side part of a scorer epoch: per sample, the Lightning "
            "epoch minus the bare scorer step measured above is "
            + ", ".join(f"{1e6 * _loop_overhead(model, model.get(k)):.0f} us at batch {model[k]['batch']}"
                        for k in ("phase3_epoch", "phase3_epoch_large_batch") if model.get(k))
            + " (loop, sampler, index-only dataset and collation, logging). **Estimate** (not a measurement): "
            "that overhead against a phase-2 step at "
            f"{ASSUMED_GPU_MFU:.0%} MFU ({share['phase2_flops_per_sample'] / 1e9:.0f} GFLOP per training sample, "
            "counted above), the GPU's own scorer step (a few kernels) neglected: "
            + "; ".join(f"batch {b}: " + ", ".join(f"{gpu} ~{100 * v:.1f}%" for gpu, v in per_gpu.items())
                        for b, per_gpu in share["gpu_estimates"].items())
            + ". A GPU host's CPU is faster than this shared one, so these lean high; `--device cuda` measures "
            "the real share.",
        ]
    return lines + [""]


def data_section(run: dict[str, Any]) -> list[str]:
    data, model = run.get("data"), run.get("model") or {}
    if not data:
        return []
    kb = data["jpeg_kib"]
    lines = [
        "### Data loading",
        "",
        f"Photo-like JPEGs (natural images upscaled plus sensor-like noise, quality 90): "
        f"{data['n_images']['256x256']} at 256x256 (pre-resized; {kb['256x256']:.1f} KiB on average) and "
        f"{data['n_images']['800x600']} at 800x600 (iNaturalist-sized originals; {kb['800x600']:.1f} KiB), "
        "in the page cache. Per-worker rates run `LongTailImageDataset` with the library's transforms in "
        "one process with 1 torch thread (what a DataLoader worker uses).",
        "",
        "| images | pipeline | images/s per worker | ms per image |",
        "| --- | --- | ---: | ---: |",
    ]
    for size, rows in data["per_worker"].items():
        for name, r in rows.items():
            lines.append(f"| {size} | {name} | {r['images_per_s']:.0f} | {r['ms_per_image']:.2f} |")
    lines += ["", "DataLoader throughput (batch "
              f"{data['loaders'][0]['batch']}, 256x256 JPEGs, train transform; this machine has "
              f"{run['machine'].get('cpu_cores_visible')} cores):", "",
              "| workers | variant | images/s |", "| ---: | --- | ---: |"]
    for r in data["loaders"]:
        lines.append(f"| {r['workers']} | {r['variant']} | {r['images_per_s']:.0f} |")
    per_worker = _data_rate(data, "256x256", "train: decode")
    if per_worker and model.get("train"):
        lines += ["", "**Workers one training step needs** = images consumed per second / images per second per "
                  f"worker ({per_worker:.0f} here, 256-px JPEGs, train transform). With dual sampling the two "
                  "streams have one DataLoader each, so `data.num_workers` is per stream and the process count "
                  "is 2 x num_workers (+ the main process).", "",
                  "| step | where | images/s consumed | workers needed (total) | `data.num_workers` (per stream) |",
                  "| --- | --- | ---: | ---: | ---: |"]
        device = "this " + ("GPU" if run["machine"]["device"].startswith("cuda") else "CPU") + " (measured)"
        for phase in ("phase1", "phase2"):
            for expert in ("visual", "vl"):
                r = _largest(model, phase, expert)
                if not r:
                    continue
                need = r["images_per_s"] / per_worker
                lines.append(f"| {PHASE_NAMES[phase]} {EXPERT_NAMES[expert]} B={r['batch_per_stream']} | {device} | "
                             f"{r['images_per_s']:,.1f} | {need:.2f} | {max(1, math.ceil(need / 2))} |")
        if not run["machine"]["device"].startswith("cuda"):
            for phase in ("phase1", "phase2"):
                r = _largest(model, phase, "visual")
                if not r:
                    continue
                flops_per_image = r["flops_per_step"] / r["images_per_step"]
                for gpu, peak in GPU_PEAKS.items():
                    rate = peak * ASSUMED_GPU_MFU / flops_per_image
                    need = rate / per_worker
                    lines.append(f"| {PHASE_NAMES[phase]} visual | **estimate**: {gpu} at {ASSUMED_GPU_MFU:.0%} MFU | "
                                 f"{rate:,.0f} | {need:.0f} | {math.ceil(need / 2)} |")
    return lines + [""] + prepared_section(data.get("prepared"), run["machine"].get("cpu_cores_visible"))


def prepared_section(prep: dict[str, Any] | None, cores: int | None) -> list[str]:
    if not prep:
        return []
    n, m = prep["n_images"], prep["machine"]
    lines = ["#### `lpt prepare`: resized copies of iNaturalist-sized originals", "",
             f"{n} photo-like 800x600 JPEGs ({prep['kib_raw']:.1f} KiB on average) prepared with the defaults (shorter "
             f"side 256, JPEG quality 90) on {m['cpu']}, {cores} shared cores, {m['date']}, load average "
             f"{m['load_average']:.1f}: the other jobs on these cores made every rate here several times lower "
             "than on an idle core (compare the 256x256 rows above), ratios hold. Seconds per 10,000 images are "
             f"**extrapolated** linearly from these {n} (pool start-up included, so they lean high).", "",
             "| format | processes | seconds for the set | seconds per 10,000 images | KiB per stored image |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in prep["cost"]:
        lines.append(f"| {r['format']} | {r['processes']} | {r['seconds']:.1f} | {r['seconds_per_10k']:,.0f} | "
                     f"{r['kib_per_image']:.1f} |")
    lines += ["", "Reading them back (`LongTailImageDataset`, the library's transforms, 1 torch thread):", "",
              "| copy, transform | images/s per worker | ms per image |", "| --- | ---: | ---: |"]
    for name, r in prep["per_worker"].items():
        lines.append(f"| {name} | {r['images_per_s']:.0f} | {r['ms_per_image']:.2f} |")
    lines += ["", "| copy (train transform, batch 16) | DataLoader workers | images/s |", "| --- | ---: | ---: |"]
    for r in prep["loaders"]:
        lines.append(f"| {r['copy']} | {r['workers']} | {r['images_per_s']:.0f} |")
    return lines + ["", PREPARED_FORMAT, ""]


PREPARED_FORMAT = """**Why LitData shards.** Class-aware sampling draws images of a class wherever they lie, so the
store must support random access by index: WebDataset is a tar stream (sequential reads only) and is
out. LitData and MosaicML Streaming (MDS) both index their shards; measured on this machine with 4,000
stored 20-30 KB items read in a random order in one process (local disk, page cache warm):
LitData 69,000-77,000 reads/s with `batch_decode=0` (1,700-2,000/s with its default, which decodes a
window of 256 items around each access, made for sequential streaming), MDS 28,000-52,000 reads/s,
one file per image 56,000-63,000/s. All are 100x above what a worker decodes, so reading never limits;
LitData is Lightning's own, already installed, and imports without extra packages (mosaicml-streaming
0.13 imports transformers and cloud SDKs at import time). `PreparedSource` opens each part's
`litdata.StreamingDataset` on first access in each DataLoader worker and DDP rank and only indexes it:
our samplers choose the items, LitData never shuffles or shards, and a local or shared-file-system
directory is read in place (LitData copies only remote or compressed datasets into a cache)."""


FAST_PATH = """### Fast path for iNaturalist-scale data

A phase-1 or phase-2 step trains only prompts, adapters, group prompts and heads, so a GPU consumes
images several times faster than in full fine-tuning, and decoding plus augmentation, not the model,
sets the pace (tables above: one worker decodes and augments a few hundred pre-resized 256-px JPEGs
per second on a fast core; an H100 would consume thousands per second). For iNaturalist 2018
(437,513 training images, originals around 800x600):

1. **Pre-resize once** with `lpt prepare --config CONFIG --output DIR` (shorter side 256 px, aspect
   kept, JPEG quality 90; `scripts/slurm/prepare.sbatch` on a CPU node), then train with
   `data.source: {class_path: lpt_lightning.data.PreparedSource, init_args: {root: DIR}}`. Decoding
   gets several times cheaper (the `lpt prepare` tables above) and files several times smaller. The
   test transform, Resize(256, 256) + CenterCrop(224), sees practically the same image;
   RandomResizedCrop(224) sees the same crops, small ones upsampled from fewer source pixels.
2. **Keep the images on local disk** (NVMe or a RAM disk), or use the LitData shards: thousands of
   images per second are tens of MB/s of small random reads, which a network file system serves
   badly as one file per image; the shards are a few hundred 64 MB files read by memory map. On network storage also set
   `data.verify_files: false` (the pre-flight check stats every one of the 437,513 files).
3. **Workers**: `data.num_workers` is per stream, and dual sampling has two streams, so a GPU uses
   2 x num_workers worker processes. Size it as images/s the GPU consumes / images/s per worker / 2
   (measure both with `python benchmarks/run_all.py --device cuda`), within the CPU cores per GPU
   (leave one for the main process).
4. **`data.persistent_workers: true`** so the 2 x num_workers workers (plus the validation loader's)
   are not re-forked every epoch; `pin_memory` is on by default when CUDA is available.
5. Check that the GPU is the bottleneck: if images/s in training is far below the step rate of
   `benchmarks/run_all.py --device cuda`, add workers or CPU cores before anything else.
"""


def findings(run: dict[str, Any]) -> list[str]:
    """Bottlenecks in lpt_lightning that the figures above expose, with before/after numbers."""
    model, data = run.get("model") or {}, run.get("data") or {}
    lines = ["### Bottlenecks found in our code, with before/after figures", ""]
    # 1. compute on discarded tokens (fixed during this issue)
    if model.get("inference"):
        ex = model.get("before_fix_exactness", {})
        lines += [
            "**1. Compute spent on tokens whose outputs are thrown away: found by these benchmarks, fixed in "
            "commit 50918b1 (\"Kept-token attention\").** Before the fix every block ran the full block on "
            "[tokens; 10 shared (+10 group) prompt tokens] and then dropped the prompt positions, and the last "
            "block of each branch computed all 197 tokens although `pool` reads only CLS; for the VL expert the "
            "attention went through `nn.MultiheadAttention`. The first measurements here put LPT++ inference at "
            "about 3.4-3.5 plain forwards (target 3.2) and the VL phase-1 step at 1.4-1.7x the visual one at "
            "equal FLOPs. The fix (`FrozenViT.run_block(..., keep=...)` and `attention_for_queries` in "
            "`lpt_lightning/models/backbones.py`, `keep=1` in the last block in `LongTailExpert.run_blocks`) "
            "computes queries, out-projection, MLP and adapter only for kept tokens. Before/after, measured side "
            "by side in this run (`benchmarks/prototypes.py` reproduces the old forward through "
            "`run_block(..., keep=None)`; max |difference| on small experts: logits "
            f"{ex.get('logits', float('nan')):.1e}, trainable gradients {ex.get('grad', float('nan')):.1e}; on the "
            "ViT-B/16 experts, logits "
            + ", ".join(f"{k} {v:.1e}" for k, v in model["inference"].get("before_fix_max_abs_logit_diff", {}).items())
            + "):",
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
            lines += ["", "The VL part of the gap was open_clip's attention itself when gradients flow through its "
                      "input (phases 1 and 2): `nn.MultiheadAttention` with `batch_first=True` takes its general path, "
                      "which transposes the input and runs the in-projection backward as `bmm` on non-contiguous "
                      "tensors. One block, forward + backward, all outputs kept, "
                      f"{ap['batch']} x {ap['tokens']} tokens (max |output difference| of the direct path "
                      f"{ap['max_abs_diff']:.1e}):", "",
                      "| block | ms | x timm block (median, min-max) |", "| --- | ---: | --- |"]
            for r in ap["rows"]:
                v = r["vs_timm"]
                lines.append(f"| {r['name']} | {r['ms']:.1f} | {v['median']:.2f} ({v['min']:.2f}-{v['max']:.2f}) |")
            lines += ["", "Remaining use of that path: `OpenClipViT.attention_branch` still calls `block.attention` when "
                      "no token is dropped (`keep` equal to the sequence length, i.e. an expert without prompts, such "
                      "as the head-only baseline); routing it through `attention_for_queries` too would remove it."]
        lines.append("")
    # 2. data hand-off
    pw = data.get("per_worker", {}).get("256x256", {})
    ours = next((r for n, r in pw.items() if n.startswith("train: decode")), None)
    u8 = next((r for n, r in pw.items() if n.startswith("train, uint8")), None)
    loaders = {(r["workers"], r["variant"]): r["images_per_s"] for r in data.get("loaders", [])}
    if ours and u8:
        l_ours, l_u8 = loaders.get((2, "ours")), loaders.get((2, "uint8 hand-off (proposed)"))
        lines += [
            "**2. Float32 images leave the workers** (`lpt_lightning/data/transforms.py`, "
            "`build_train_transform` / `build_eval_transform` end in `T.ToTensor()`). Each 224x224 image is "
            "converted and divided in the worker and crosses process boundaries and pinned memory as 602 KB "
            "of float32 instead of 151 KB of uint8. Per worker: "
            f"{ours['images_per_s']:.0f} images/s with `ToTensor` versus {u8['images_per_s']:.0f} with "
            f"`PILToTensor` (x{u8['images_per_s'] / ours['images_per_s']:.2f})"
            + (f" (interleaved, median); through a 2-worker DataLoader {l_ours:.0f} versus {l_u8:.0f} images/s "
               f"(x{l_u8 / l_ours:.2f}; one short run each on 2 shared cores, indicative only)"
               if l_ours and l_u8 else "")
            + ". Proposed fix: end the transforms with `T.PILToTensor()` and divide by 255 on the device (in "
            "`FrozenViT.normalise`, which already runs there, or in `on_after_batch_transfer`); uint8 batches "
            "also make pinned-memory copies 4x smaller.", ""]
    # 3. phase-3 caches at scale
    lines += [
        "**3. Phase-3 caches grow with classes x held-out images and are held in RAM on every rank** "
        "(`lpt_lightning/phases/moe_scorer.py`, `MoEScorerPhase.outputs`; `lpt_lightning/expert_cache.py`, "
        "`load_cache`). For val/test the cache keeps both experts' full fp32 probability vectors "
        "(N x C x 4 B x 2) and query features (N x (768 + 512) x 4 B). Since the evaluation protocol fix "
        "(issue 10), the scorer is fitted on the held-out split by default (`scorer.fit_on: heldout`): phase 3 "
        "runs no inference over the training set at all, and a dataset without a validation split carves one "
        "out of train before phase 1 (`data.holdout_per_class: 5`, at most 20 % of a class), never the test "
        "split. Sizes (computed from the formulas, not measured; the `fit_on: train` ablation adds the training "
        "images' queries):",
        "",
        "| dataset | classes | held-out (val) | test | total in RAM per rank | `fit_on: train` adds |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    gib = 2.0 ** 30
    for name, classes, n_train, n_val, carved, n_test in (
            ("Places-LT", 365, 62_500, 7_300, False, 36_500),
            ("ImageNet-LT", 1_000, 115_846, 20_000, False, 50_000),
            ("iNaturalist 2018", 8_142, 437_513, 8_142 * 5, True, 24_426)):
        train = n_train * (768 + 512) * 4 / gib
        val = n_val * (classes * 2 + 1280) * 4 / gib
        test = n_test * (classes * 2 + 1280) * 4 / gib
        held = f"{'<= ' if carved else ''}{val:.2f} GiB{' (carved, 5/class)' if carved else ''}"
        lines.append(f"| {name} | {classes:,} | {held} | {test:.2f} GiB | {'<= ' if carved else ''}{val + test:.2f} GiB "
                     f"| {train:.2f} GiB |")
    lines += ["",
              "Proposed next steps: (a) store cosine logits (in [-1, 1]) and queries as float16 and apply "
              "softmax(s * z) per batch: half the bytes, and W_base search and the scorer see the same argmax up to "
              "rounding; (b) load caches with `torch.load(..., mmap=True)` in `load_cache` so the DDP ranks of a "
              "node share one copy through the page cache (8 ranks x 4.3 GiB is 34 GiB of host RAM for "
              "iNaturalist today).", ""]
    # 4. phase-3 per-sample overhead
    epoch = model.get("phase3_epoch")
    steps = model.get("phase3_steps") or []
    if epoch and steps:
        bare = next((r for r in steps if r["batch"] == epoch["batch"]), steps[0])
        lines += [
            "**4. A scorer epoch is per-sample Python overhead, not compute** (`MoEScorerPhase` training loop). "
            f"The bare `training_step` + AdamW takes {1e6 * bare['step_s'] / bare['batch']:.1f} us per sample at batch "
            f"{bare['batch']}, the full Lightning epoch {1e6 * epoch['s_per_sample']:.1f} us per sample: the rest "
            "is the index-only `LongTailImageDataset.__getitem__` (a dict and a tensor per sample), "
            "`default_collate`, the class-aware sampler, two `self.log` calls and the loop itself, at 64 "
            "samples per step. It is far below 2% of a phase-2 epoch on this machine; on a fast GPU it is the "
            "part of phase 3 that does not shrink (estimate in the summary). If it matters: train the scorer "
            "with a larger batch (`phase3.data.batch_size`, e.g. 1024: the cached rows make that free) or "
            "iterate index tensors directly (a batch sampler yielding index tensors, no per-sample dataset "
            "calls).", ""]
    lines += [
        "**5. Intra-op threads on small shared CPUs** (not a line of our code, but our CPU path: `make demo`, "
        "`configs/cpu/`, the test suite). With torch's default of one OpenMP thread per core on this 2-core "
        "machine, every small op of a tiny model waits for the sibling thread whenever another process holds "
        "the other core. Measured once while setting up the accuracy study (phase 1 of the tiny visual expert, "
        "2 epochs of CIFAR-10-LT through the pipeline, same seed): 241 s with 2 threads, 48 s with 1, identical "
        "metrics. The same effect made the small-tensor sections above swing 10-50x before they were pinned to "
        "1 thread. Proposed: `OMP_NUM_THREADS=1` (or `torch.set_num_threads(1)`) in the `demo`/`test` targets "
        "and a line in the README's CPU notes; `benchmarks/accuracy_study.py` does this (`--threads`).", "",
        "**Not measured here (GPU only):** every training step calls `ExpertPhase._nonfinite` "
        "(`lpt_lightning/phases/base.py`: `bool(torch.isfinite(loss))`), a device-to-host synchronisation that "
        "keeps the CPU from queueing the backward while the forward still runs; with `on_nonfinite: skip` under "
        "DDP it adds a `reduce_boolean_decision` all-reduce per step. Free on the CPU; on a GPU check it with "
        "`--device cuda` or the PyTorch profiler. If it shows: in `stop` mode, check a detached copy every N "
        "steps (or after the optimizer step); `skip` needs the answer before the step, so it keeps the sync.", ""]
    return lines


def render(results: Path) -> str:
    runs = _load(results)
    lines = [
        "# Benchmarks",
        "",
        "Speed and memory of `lpt_lightning` with the real ViT-B/16 shapes: timm `vit_base_patch16_224` "
        "(the architecture of `augreg_in21k`) and the open_clip `ViT-B-16` image tower, both with random "
        "weights (no download; speed does not depend on the weights). Regenerate this page with "
        "`make bench` (`python benchmarks/run_all.py`); on a GPU, `python benchmarks/run_all.py --device cuda` "
        "adds a bf16-mixed section. Raw numbers: `benchmarks/results/bench_<device>.json`.",
        "",
        "Method: every time is the median of several runs after warm-up; ratios are measured side by side "
        "in one process (candidates alternate within each round) and reported as the median of per-round "
        "ratios, so that load from other processes affects both sides alike.",
        "",
    ]
    if not runs:
        lines.append("No results yet: run `make bench`.")
    for run in runs:
        m = run["machine"]
        where = m.get("gpu") or m["cpu"]
        title = f"## {'GPU' if m['device'].startswith('cuda') else 'CPU'}: {where}, {m['precision']}"
        lines += [title, ""]
        if m["device"] == "cpu":
            lines += [f"**CPU figures were taken on a {m['cpu_cores_visible']}-core machine** ({m['cpu']}, "
                      f"{m['torch_threads']} torch thread{'s' if m['torch_threads'] != 1 else ''}: the cores are "
                      "shared with other jobs, and with 2 OpenMP threads every barrier stalled whenever the other "
                      "core was taken, which swung step times up to 5x) (load average "
                      f"{_f(run.get('load_average_start'), 1)} at the start, {_f(run.get('load_average_end'), 1)} at "
                      "the end): absolute times are noisy and slow, batch sizes are tiny (1-4 images per stream), "
                      "and fp32 is used because bf16 matmuls on this CPU are hundreds of times slower. Ratios "
                      "are the robust figures.", ""]
        if run.get("quick"):
            lines += ["**Quick mode** (`--quick`): fewer batch sizes and rounds; a smoke run, not the reference figures.", ""]
        lines += [f"Command `{run['command']}`, {run['date']}, {run['seconds'] / 60:.1f} min; torch {m['torch']}, "
                  f"timm {m.get('timm')}, open_clip {m.get('open_clip')}.", ""]
        model = run.get("model")
        lines += ["### Summary", ""] + summary(run)
        if model:
            lines += training_section(model, m["precision"]) + prefix_section(model) + inference_section(model)
            lines += mfu_section(model, m) + cost_section(model) + phase3_section(model)
        lines += data_section(run)
        lines += findings(run)
    lines += [FAST_PATH]
    return "\n".join(lines).rstrip() + "\n"
