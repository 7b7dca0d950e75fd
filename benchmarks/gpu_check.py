"""One command for a GPU's few minutes: ViT-B/16 phase-2 figures in bf16, the loader, a short run.

    python benchmarks/gpu_check.py              # one CUDA GPU, bf16-mixed, about 5-8 minutes
    python benchmarks/gpu_check.py --dry-run    # the same script on the CPU at tiny shapes, fp32, < 1 min

Figures (each section is written to the JSON as soon as it is measured, so a run cut short keeps
what it measured): phase-2 training images/s and MFU (batch 128 and 256 images per step, eager and
``model.compile``; FLOPs counted by ``FlopCounterMode``, the card's dense bf16 peak from
``BF16_PEAKS``), inference images/s, peak memory, the training loader's images/s with 15 workers
over `lpt prepare` shards of synthetic iNaturalist-sized JPEGs, ``data.decode_jpeg_on_device``
images/s, and a 200-step bf16 phase-2 run on synthetic data whose loss must go down.

Writes ``benchmarks/results/bench_cuda.json`` and re-renders docs/benchmarks.md (its "GPU check"
section); a dry run writes both under ``--out`` (default: a fresh temporary folder) instead.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks import common as C  # noqa: E402
from benchmarks import report  # noqa: E402

# Dense bf16 tensor-core peaks (vendor data sheets, no sparsity), matched in this order against
# torch.cuda.get_device_name (e.g. "NVIDIA H100 80GB HBM3" is the SXM card).
BF16_PEAKS = [("H200", 989e12), ("GH200", 989e12), ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12),
              ("A100", 312e12), ("L40S", 362e12), ("A10G", 70e12), ("A10", 125e12), ("L4", 121e12)]
TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=8, num_heads=2)  # dry run (group prompts from block 6)
LOADER_WORKERS = 15  # a 16-core node: one core for the training process


def bf16_peak(device_name: str) -> tuple[float | None, str | None]:
    for key, peak in BF16_PEAKS:
        if key in device_name:
            return peak, key
    return None, None


class Check:
    """Settings of a real or dry run, and the results written after every section."""

    def __init__(self, dry_run: bool, out: Path, doc: Path, command: str):
        self.dry_run = dry_run
        self.env = C.make_env("cpu" if dry_run else "cuda", "fp32" if dry_run else "bf16-mixed")
        self.img = 32 if dry_run else 224
        self.model_kwargs = TINY_VIT if dry_run else None
        self.batches = [8, 16] if dry_run else [128, 256]  # images per step (two streams)
        self.rounds, self.warmup = (2, 1) if dry_run else (10, 3)
        self.workers = 2 if dry_run else LOADER_WORKERS
        self.out, self.doc = out, doc
        self.t0 = time.perf_counter()
        self.result: dict[str, Any] = {"kind": "gpu_check", "dry_run": dry_run, "machine": C.machine_info(self.env),
                                       "date": time.strftime("%Y-%m-%d %H:%M"), "command": command, "sections_s": {}}

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f}s] {msg}", flush=True)

    def section(self, name: str, fn) -> None:
        t = time.perf_counter()
        self.log(f"== {name} ==")
        self.result[name] = fn()
        self.result["sections_s"][name] = time.perf_counter() - t
        self.save()

    def save(self) -> None:
        self.result["seconds"] = time.perf_counter() - self.t0
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "bench_cuda.json").write_text(json.dumps(self.result, indent=1, default=str))
        self.doc.parent.mkdir(parents=True, exist_ok=True)
        self.doc.write_text(report.render(self.out))


def _phase2(check: Check, num_classes: int, scratch: Path):
    """A ViT-B/16 (dry run: tiny) phase-2 module started from a phase-1 checkpoint, on the device."""
    counts = C.class_counts(num_classes)
    p1 = C.build_phase1("visual", counts, model_kwargs=check.model_kwargs)
    ckpt = C.save_phase_checkpoint(p1, scratch / f"phase1_{num_classes}.ckpt")
    del p1
    return C.build_phase2(ckpt, counts).to(check.env.device).train()


def _compile(check: Check, module) -> str:
    """The library's ``model.compile`` path; the dry run traces with dynamo's eager backend (the
    inductor parity is tests/test_compile.py's, and C++ kernel builds would take minutes here)."""
    torch._dynamo.reset()  # static shapes for each batch size, and an honest compile time
    if check.dry_run:
        module.expert.compile(backend="eager")
        return "dynamo, eager backend"
    module.compile_expert = True
    module.configure_model()
    return "inductor"


def train_section(check: Check, scratch: Path) -> dict[str, Any]:
    env = check.env
    if env.is_cuda:
        peak, key = bf16_peak(torch.cuda.get_device_name(env.device))
        peak_source = f"BF16_PEAKS[{key!r}]" if key else None
    else:
        peak, peak_source = C.matmul_peak(env, quick=True)["flops_per_s"], "measured fp32 matmul (dry run)"
    module = _phase2(check, C.INAT_CLASSES, scratch)
    optimizer = C.sgd_for(module)
    rows, flops = [], {}
    infer = None
    for mode in ("eager", "compiled"):
        if mode == "compiled":
            infer = _inference(check, module)  # eager, before the expert is compiled in place
        for images in check.batches:
            batch = C.dual_batch(images // 2, C.INAT_CLASSES, check.img, env.device, seed=images)
            step = C.train_step_fn(module, optimizer, batch, env)
            row: dict[str, Any] = {"mode": mode, "images_per_step": images}
            if mode == "eager":
                with C.flop_counter() as counter:
                    step()
                flops[images] = counter.get_total_flops()
            else:
                row["compile_backend"] = _compile(check, module)
                env.sync()
                t = time.perf_counter()
                step()  # compiles the forward and the backward
                env.sync()
                row["first_step_s"] = time.perf_counter() - t
            s = C.median(C.time_interleaved({"step": step}, check.rounds, check.warmup, env)["step"])
            row |= {"flops_per_step": flops[images], "step_s": s, "images_per_s": images / s,
                    "achieved_flops_per_s": flops[images] / s, "mfu": flops[images] / s / peak if peak else None}
            # The CPU's memory counter is a dispatch mode, which compiled code does not go through.
            if env.is_cuda or mode == "eager":
                row["peak_gib"] = C.peak_memory(step, env, C.tensors_of(module, optimizer, batch))["peak_gib"]
            rows.append(row)
            mfu = "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
            first = f", first step {row['first_step_s']:.1f} s (compile included)" if mode == "compiled" else ""
            check.log(f"  {mode} B={images}: {row['images_per_s']:,.0f} img/s, MFU {mfu}{first}")
    torch._dynamo.reset()
    del module, optimizer
    return {"peak_flops_per_s": peak, "peak_source": peak_source,
            "peak_note": None if peak else "unknown card: add its dense bf16 peak to BF16_PEAKS",
            "num_classes": C.INAT_CLASSES, "rows": rows, "inference": infer}


def _inference(check: Check, module) -> dict[str, Any]:
    env, images = check.env, check.batches[-1]
    x = torch.rand(images, 3, check.img, check.img, device=env.device)
    module.eval()

    def forward():
        with torch.inference_mode(), env.autocast():
            module.expert(x)

    times = C.time_interleaved({"forward": forward}, check.rounds, check.warmup, env)["forward"]
    memory = C.peak_memory(forward, env, C.tensors_of(module, x))["peak_gib"]
    module.train()
    out = {"batch": images, "images_per_s": images / C.median(times), "peak_gib": memory}
    check.log(f"  inference B={images}: {out['images_per_s']:,.0f} img/s")
    return out


def _synthetic_jpegs(check: Check, scratch: Path, n_items: int):
    """iNaturalist-sized (800x600) photo-like JPEGs, repeated to ``n_items`` items (the loader's
    cost does not depend on which photo an item holds)."""
    from benchmarks.bench_data import _files_source, make_jpegs

    originals = make_jpegs(scratch / "originals", 16 if check.dry_run else 128, (800, 600), seed=3)
    return _files_source((originals * (n_items // len(originals) + 1))[:n_items])


def loader_section(check: Check, scratch: Path) -> dict[str, Any]:
    from benchmarks.bench_data import _loader_rate
    from lpt_lightning.data import LongTailDataModule, PreparedSource
    from lpt_lightning.prepare import prepare

    n_items = 256 if check.dry_run else 12_288
    source = _synthetic_jpegs(check, scratch, n_items)
    per_stream = check.batches[0] // 2
    out: dict[str, Any] = {"workers": check.workers, "items": n_items, "batch_per_stream": per_stream,
                           "pin_memory": check.env.is_cuda}
    copies = {}
    for fmt in ("litdata", "tree"):
        t = time.perf_counter()
        copies[fmt] = scratch / f"prepared_{fmt}"
        prepare(source, copies[fmt], fmt=fmt, short_side=256, workers=check.workers, part_size=512, progress=False)
        out[f"prepare_{fmt}_s"] = time.perf_counter() - t
    dm = LongTailDataModule(PreparedSource(str(copies["litdata"])), batch_size=per_stream, sampling="dual",
                            num_workers=check.workers, img_size=check.img, verify_images="off",
                            pin_memory=check.env.is_cuda)
    out["images_per_s"] = _loader_rate(dm.train_dataloader(), check.workers)
    check.log(f"  training loader, {check.workers} workers, shards: {out['images_per_s']:,.0f} img/s")
    out["device_decode"] = _device_decode(check, copies["tree"])
    return out


def _device_decode(check: Check, tree: Path) -> dict[str, Any]:
    """``data.decode_jpeg_on_device``: the workers deliver file bytes, the device decodes each
    batch in one ``decode_jpeg`` call and crops it (nvjpeg on CUDA; libjpeg on the CPU)."""
    from lpt_lightning.data import LongTailDataModule, PreparedSource

    env = check.env
    dm = LongTailDataModule(PreparedSource(str(tree)), batch_size=check.batches[0] // 2, sampling="dual",
                            num_workers=check.workers, img_size=check.img, verify_images="off", pin_memory=False,
                            decode_jpeg_on_device=True)
    batches = list(dm.train_dataloader())  # file bytes only (shards hold no files to decode on the device)

    def decode(batch) -> int:
        for stream in batch.values():
            stream["label"] = stream["label"].to(env.device)
        # Without a trainer the hook applies the eval transform (resize + centre crop) after decoding.
        return sum(stream["image"].shape[0] for stream in dm.on_after_batch_transfer(batch, 0).values())

    decode(batches.pop(0))  # warm-up (nvjpeg handles, allocator)
    env.sync()
    t = time.perf_counter()
    images = sum(decode(b) for b in batches)
    env.sync()
    out = {"images": images, "images_per_batch": check.batches[0], "images_per_s": images / (time.perf_counter() - t),
           "where": "nvjpeg (CUDA)" if env.is_cuda else "libjpeg on the CPU (dry run)"}
    check.log(f"  device decode + crop, {out['where']}: {out['images_per_s']:,.0f} img/s")
    return out


def run_section(check: Check, scratch: Path) -> dict[str, Any]:
    """200 phase-2 steps in the check's precision on a learnable synthetic task (each class a
    colour, plus noise): the loss must go down."""
    env, classes, steps = check.env, 10, 200
    module = _phase2(check, classes, scratch)
    optimizer = C.sgd_for(module)
    g = torch.Generator().manual_seed(0)
    colours = torch.rand(classes, 3, 1, 1, generator=g)
    per_stream = check.batches[0] // 2
    losses = []
    t = time.perf_counter()
    for _ in range(steps):
        batch = {}
        for stream in ("cb", "ib"):
            labels = torch.randint(0, classes, (per_stream,), generator=g)
            noise = torch.rand(per_stream, 3, check.img, check.img, generator=g)
            batch[stream] = {"image": (0.6 * colours[labels] + 0.4 * noise).to(env.device),
                             "label": labels.to(env.device)}
        with env.autocast():
            loss = module.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    curve = torch.stack(losses).float().cpu().tolist()  # one read at the end, no sync per step
    first, last = sum(curve[:20]) / 20, sum(curve[-20:]) / 20
    out = {"steps": steps, "images_per_step": 2 * per_stream, "num_classes": classes, "precision": env.precision,
           "seconds": time.perf_counter() - t, "loss_first_20": first, "loss_last_20": last,
           "loss_every_10": curve[::10], "loss_went_down": last < 0.9 * first}
    check.log(f"  200 steps: loss {first:.3f} -> {last:.3f} (first / last 20 steps)")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, fp32, tiny shapes: checks the script, < 1 min")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder of bench_cuda.json (default: benchmarks/results; dry run: a temporary folder)")
    parser.add_argument("--doc", type=Path, default=None,
                        help="page to render (default: docs/benchmarks.md; dry run: <out>/benchmarks.md)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device is visible: run on a GPU machine, or use --dry-run to check the script here")
    out = args.out or (C.scratch_dir() if args.dry_run else REPO / "benchmarks" / "results")
    doc = args.doc or (out / "benchmarks.md" if args.dry_run else REPO / "docs" / "benchmarks.md")
    command = "python benchmarks/gpu_check.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    torch.manual_seed(0)
    if args.dry_run:
        torch.set_num_threads(1)  # see run_all.py: one thread measures steadily on a shared CPU
    check = Check(args.dry_run, out, doc, command)
    scratch = C.scratch_dir()
    try:
        check.section("train", lambda: train_section(check, scratch))
        check.section("run_200", lambda: run_section(check, scratch))
        check.section("loader", lambda: loader_section(check, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    check.log(f"wrote {out / 'bench_cuda.json'} and {doc}")
    return 0 if check.result["run_200"]["loss_went_down"] else 1


if __name__ == "__main__":
    sys.exit(main())
