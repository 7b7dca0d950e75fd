"""Model-side benchmarks with the real ViT-B/16 shapes (timm ViT-B/16 and open_clip CLIP ViT-B/16,
random weights): training steps of phases 1-3, prefix reuse versus the plain two-pass computation,
inference cost as multiples of one plain ViT-B/16 forward, MFU, head + loss cost growth and the
phase-3 scorer (its step and its epochs through Lightning on memory-mapped expert outputs).

Sections (``run(..., sections=...)``, ``run_all.py --only model --sections ...``): ``experts``
(matmul peak, phases 1-2, prefix reuse, inference, attention paths), ``phase3`` (scorer) and
``cost_growth`` (head + loss); ``phase3`` alone still builds the phase-1/2 checkpoints it starts from.
"""
from __future__ import annotations

import contextlib
import gc
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks import common as C


@dataclass
class ModelConfig:
    train_batches: list[int]  # per stream (dual sampling: 2x images per step)
    rounds: int
    warmup: int
    ratio_batch: int  # per stream, for prefix reuse vs two-pass
    ratio_rounds: int
    infer_batch: int
    infer_rounds: int
    phase3_batches: list[int]
    phase3_epoch_samples: int  # rows of the cached held-out split the scorer is fitted on
    phase3_epochs: int = 3  # scorer epochs through Lightning's loop; the best one is reported
    cost_classes: list[int] = field(default_factory=lambda: [365, 1000, 8142])
    cost_batch: int = 128  # 2 streams x 64 (the configs' per-device batch)
    cost_rounds: int = 7
    fast_batch: int = 1  # per stream, phase-1 library vs the forward before the kept-token fix
    num_classes: int = C.PLACES_LT_CLASSES


def config_for(env: C.Env, quick: bool) -> ModelConfig:
    if env.is_cuda:
        return ModelConfig(train_batches=[16, 32, 64] if quick else [16, 32, 64, 128], rounds=10, warmup=3,
                           ratio_batch=64, ratio_rounds=10, infer_batch=64, infer_rounds=10,
                           phase3_batches=[64, 256, 1024], phase3_epoch_samples=62_500,
                           fast_batch=64)
    if quick:
        return ModelConfig(train_batches=[1, 2], rounds=2, warmup=1, ratio_batch=1, ratio_rounds=3,
                           infer_batch=2, infer_rounds=3, phase3_batches=[64, 256],
                           phase3_epoch_samples=8_192, phase3_epochs=2, cost_rounds=5)
    return ModelConfig(train_batches=[1, 2, 4], rounds=3, warmup=1, ratio_batch=1, ratio_rounds=6,
                       infer_batch=2, infer_rounds=6, phase3_batches=[64, 256, 1024],
                       phase3_epoch_samples=20_000, phase3_epochs=5)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _oom_guard(fn):
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        _free()
        return None


def _bench_train(module, env: C.Env, cfg: ModelConfig, phase: str, kind: str, log) -> list[dict[str, Any]]:
    """Step time, images/s, peak memory and FLOPs of one phase across batch sizes."""
    module.to(env.device).train()
    optimizer = C.sgd_for(module)
    rows = []
    for b in cfg.train_batches:
        batch = C.dual_batch(b, cfg.num_classes, 224, env.device, seed=b)
        step = C.train_step_fn(module, optimizer, batch, env)

        probe, probe_flops = C.matmul_probe(env)

        def measure():
            both = C.time_interleaved({"step": step, "probe": probe}, cfg.rounds, cfg.warmup, env)
            with C.flop_counter() as flops:
                mem = C.peak_memory(step, env, C.tensors_of(module, optimizer, batch))
            return both, mem, flops.get_total_flops()

        out = _oom_guard(measure)
        if out is None:
            rows.append({"phase": phase, "expert": kind, "batch_per_stream": b, "oom": True})
            log(f"  {phase} {kind} B={b}: out of memory")
            break
        both, mem, flops = out
        times = both["step"]
        t = C.median(times)
        # Paired MFU: per round, (step FLOPs / step time) / (probe FLOPs / probe time).
        mfu = C.paired_ratio([flops / x for x in times], [probe_flops / p for p in both["probe"]])
        row = {"phase": phase, "expert": kind, "batch_per_stream": b, "images_per_step": 2 * b,
               "step_s": t, "step_s_min": min(times), "step_s_max": max(times), "images_per_s": 2 * b / t,
               "flops_per_step": flops, "achieved_flops_per_s": flops / t,
               "probe_flops_per_s": probe_flops / C.median(both["probe"]), "mfu_paired": mfu, **mem}
        rows.append(row)
        log(f"  {phase} {kind} B={b}x2: {t:.3f} s/step ({row['images_per_s']:.2f} img/s), "
            f"peak {mem['peak_gib']:.2f} GiB, {flops / 1e9:.0f} GFLOP/step")
    del optimizer
    _free()
    return rows


def _bench_fast_phase1(module, env: C.Env, cfg: ModelConfig, kind: str, log) -> dict[str, Any]:
    """Phase-1 step: library forward (after the kept-token fix) versus the forward before it
    (benchmarks/prototypes.py), side by side."""
    from benchmarks.prototypes import legacy_forward

    module.to(env.device).train()
    optimizer = C.sgd_for(module)
    batch = C.dual_batch(cfg.fast_batch, cfg.num_classes, 224, env.device, seed=321)
    step = C.train_step_fn(module, optimizer, batch, env)

    def before_step():
        with C.forward_replaced(module.expert, legacy_forward):
            step()

    times = C.time_interleaved({"library": step, "before": before_step}, cfg.ratio_rounds, cfg.warmup, env)
    with C.forward_replaced(module.expert, legacy_forward), C.flop_counter() as counter:
        mem = C.peak_memory(step, env, C.tensors_of(module, optimizer, batch))
    with C.flop_counter() as after:
        step()
    res = {"phase": "phase1", "expert": kind, "batch_per_stream": cfg.fast_batch,
           "library_s": C.median(times["library"]), "before_s": C.median(times["before"]),
           "ratio": C.paired_ratio(times["library"], times["before"]), "before_flops": counter.get_total_flops(),
           "library_flops": after.get_total_flops(), "before_peak_gib": mem["peak_gib"]}
    log(f"  phase1 {kind}: library {res['library_s']:.3f} s vs before the kept-token fix {res['before_s']:.3f} s "
        f"(after/before x{res['ratio']['median']:.3f})")
    del optimizer
    _free()
    return res


def _bench_prefix_reuse(module, env: C.Env, cfg: ModelConfig, kind: str, log) -> dict[str, Any]:
    """Phase-2 training step with prefix reuse versus the plain two-pass computation, side by side."""
    module.to(env.device).train()
    optimizer = C.sgd_for(module)
    batch = C.dual_batch(cfg.ratio_batch, cfg.num_classes, 224, env.device, seed=123)
    step = C.train_step_fn(module, optimizer, batch, env)

    def two_pass_step():
        with C.forward_replaced(module.expert, C.two_pass_forward):
            step()

    from benchmarks.prototypes import legacy_forward

    def before_step():
        with C.forward_replaced(module.expert, legacy_forward):
            step()

    # The two computations give the same outputs (checked here, not only in the tests).
    module.eval()
    with torch.no_grad(), env.autocast():
        images = batch["cb"]["image"]
        a = module.expert(images)
        b = C.two_pass_forward(module.expert, images)
    max_diff = float((a.logits.float() - b.logits.float()).abs().max())
    module.train()
    flops = {}
    for name, fn in (("prefix_reuse", step), ("two_pass", two_pass_step), ("before", before_step)):
        with C.flop_counter() as counter:
            fn()
        flops[name] = counter.get_total_flops()
    times = C.time_interleaved({"prefix_reuse": step, "two_pass": two_pass_step, "before": before_step},
                               cfg.ratio_rounds, cfg.warmup, env)
    ratio = C.paired_ratio(times["prefix_reuse"], times["two_pass"])
    res = {"expert": kind, "batch_per_stream": cfg.ratio_batch, "prefix_reuse_s": C.median(times["prefix_reuse"]),
           "two_pass_s": C.median(times["two_pass"]), "ratio": ratio,
           "flop_ratio": flops["prefix_reuse"] / flops["two_pass"], "max_abs_logit_diff": max_diff,
           "before_s": C.median(times["before"]),
           "library_vs_before": C.paired_ratio(times["prefix_reuse"], times["before"]),
           "before_vs_two_pass": C.paired_ratio(times["before"], times["two_pass"]),
           "before_flops": flops["before"], "library_flops": flops["prefix_reuse"]}
    log(f"  prefix reuse {kind}: {res['prefix_reuse_s']:.3f} s vs two-pass {res['two_pass_s']:.3f} s, "
        f"ratio {ratio['median']:.3f} (FLOP ratio {res['flop_ratio']:.3f}); before the kept-token fix "
        f"{res['before_s']:.3f} s (after/before x{res['library_vs_before']['median']:.3f})")
    del optimizer
    _free()
    return res


def _bench_inference(phase3, env: C.Env, cfg: ModelConfig, log) -> dict[str, Any]:
    """Per-image inference cost as a multiple of one plain timm ViT-B/16 forward."""
    from lpt_lightning.models.expert import GroupPromptSpec, LongTailExpert

    phase3.to(env.device).eval()
    visual = phase3.visual
    # LPT = the visual expert without adapters (phases 1-2), sharing the same frozen backbone.
    lpt = LongTailExpert(C.expert_spec("visual", adapters=False), cfg.num_classes, group=GroupPromptSpec(),
                         backbone=visual.backbone).to(env.device).eval()
    x = torch.rand(cfg.infer_batch, 3, 224, 224, device=env.device)
    plain_vit = visual.backbone.model  # timm VisionTransformer, num_classes=0: the pooled feature

    from benchmarks.prototypes import legacy_forward

    def both_before():
        with C.forward_replaced(phase3.visual, legacy_forward), C.forward_replaced(phase3.vl, legacy_forward):
            return phase3(x)

    def both_two_pass():
        with C.forward_replaced(phase3.visual, C.two_pass_forward), C.forward_replaced(phase3.vl, C.two_pass_forward):
            return phase3(x)

    fns = {
        "plain ViT-B/16 forward (timm)": lambda: plain_vit(x),
        "plain CLIP ViT-B/16 image tower": lambda: phase3.vl.backbone.visual(x),
        "LPT, prefix reuse": lambda: lpt(x),
        "LPT, two-pass": lambda: C.two_pass_forward(lpt, x),
        "LPT++ mixture, prefix reuse (MoEScorerPhase.forward)": lambda: phase3(x),
        "LPT++ mixture, two-pass": both_two_pass,
        "LPT, before the kept-token fix": lambda: legacy_forward(lpt, x),
        "LPT++ mixture, before the kept-token fix": both_before,
    }
    with torch.inference_mode(), env.autocast():
        flops = {}
        for name, fn in fns.items():
            with C.flop_counter() as counter:
                fn()
            flops[name] = counter.get_total_flops()
        times = C.time_interleaved(fns, cfg.infer_rounds, cfg.warmup, env)
        diffs = {}
        for name, expert in (("visual", phase3.visual), ("vl", phase3.vl), ("lpt", lpt)):
            a, b = expert(x), legacy_forward(expert, x)
            diffs[name] = float((a.logits.float() - b.logits.float()).abs().max())
    ref = "plain ViT-B/16 forward (timm)"
    rows = []
    for name in fns:
        rows.append({"name": name, "s_per_batch": C.median(times[name]),
                     "ms_per_image": 1000 * C.median(times[name]) / cfg.infer_batch,
                     "multiple": C.paired_ratio(times[name], times[ref]),
                     "flop_multiple": flops[name] / flops[ref], "gflops_per_image": flops[name] / cfg.infer_batch / 1e9})
        log(f"  {name}: {rows[-1]['ms_per_image']:.0f} ms/img, x{rows[-1]['multiple']['median']:.2f} "
            f"(FLOPs x{rows[-1]['flop_multiple']:.2f})")
    del lpt
    _free()
    return {"batch": cfg.infer_batch, "rows": rows, "before_fix_max_abs_logit_diff": diffs}


def _bench_attention_paths(phase3, env: C.Env, cfg: ModelConfig, log) -> dict[str, Any]:
    """One ViT-B/16 block, forward + backward into its input (what phases 1-2 do through frozen
    blocks), [tokens; 10 prompts] with all outputs kept: timm's block, open_clip's block
    (nn.MultiheadAttention, the path before the fix), and open_clip's block through the library's
    direct attention (``attention_for_queries``: same weights, one SDPA call)."""

    tv, tl = phase3.visual.backbone, phase3.vl.backbone
    tb, cb = tv.blocks[0], tl.blocks[0]
    xs = {bb: torch.randn(2 * cfg.ratio_batch, 207, bb.embed_dim, device=env.device, requires_grad=True)
          for bb in (tv, tl)}

    def clip_direct(h):
        h1 = h + tl.attention_for_queries(cb, h, h.shape[1])
        return h1 + tl.mlp_branch(cb, h1)

    def fwd_bwd(fn, x):
        def run():
            with env.autocast():
                y = fn(x)
            y.float().sum().backward()
            x.grad = None
        return run

    fns = {"timm block": fwd_bwd(tb, xs[tv]), "open_clip block (nn.MultiheadAttention)": fwd_bwd(cb, xs[tl]),
           "open_clip block, library's direct attention (after the fix)": fwd_bwd(clip_direct, xs[tl])}
    with torch.no_grad():
        diff = float((cb(xs[tl]) - clip_direct(xs[tl])).abs().max())
    times = C.time_interleaved(fns, cfg.ratio_rounds + 2, cfg.warmup, env)
    ref = "timm block"
    rows = [{"name": n, "ms": 1000 * C.median(t), "vs_timm": C.paired_ratio(t, times[ref])} for n, t in times.items()]
    for r in rows:
        log(f"  {r['name']}: {r['ms']:.1f} ms fwd+bwd (x{r['vs_timm']['median']:.2f} of timm)")
    return {"batch": 2 * cfg.ratio_batch, "tokens": 207, "rows": rows, "max_abs_diff": diff}


class _StandInExpert(nn.Module):
    """Stands in for a frozen expert in the prediction pass: random query features and logits of
    the real shapes (speed does not depend on the values), seeded by each batch's first row."""

    def __init__(self, feature_dim: int, num_classes: int, seed: int):
        super().__init__()
        self.feature_dim, self.num_classes, self.seed = feature_dim, num_classes, seed

    def forward(self, images: torch.Tensor) -> SimpleNamespace:  # "images": the rows' indices
        g = torch.Generator().manual_seed(1_000_003 * self.seed + int(images[0]))
        n = images.shape[0]
        return SimpleNamespace(query=torch.randn(n, self.feature_dim, generator=g),
                               logits=torch.rand(n, self.num_classes, generator=g) * 2 - 1)


class _RowsToPredict(torch.utils.data.Dataset):
    """The prediction pass's input rows: index, label and a placeholder image (the index)."""

    def __init__(self, labels: np.ndarray):
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"index": i, "label": int(self.labels[i]), "image": float(i)}


def _write_fake_outputs(phase3, directory: Path, labels: np.ndarray, dtype: str = "float16") -> Path:
    """A held-out split of expert outputs in the real file format: the library's `ExpertRowsPredictor`
    predict step and `ExpertCacheWriter` (fp16 memory-mapped .npy shards + manifest) through
    Lightning's predict loop, with stand-in experts of the ViT-B/16 output shapes."""
    import lightning as L

    from lpt_lightning.expert_cache_writer import ExpertCacheWriter, OutputsTarget
    from lpt_lightning.expert_outputs import ExpertRowsPredictor

    num_classes = phase3.num_classes
    experts = {kind: _StandInExpert(expert.backbone.feature_dim, num_classes, seed)
               for seed, (kind, expert) in enumerate(phase3.experts().items())}
    facts = {"class_counts": np.bincount(labels, minlength=num_classes).tolist(),
             "class_names": [f"c{i}" for i in range(num_classes)], "record": {"benchmark": "fake expert outputs"}}
    manifest = {"key": "benchmark", "split": "val", "label_only": False, "dtype": dtype, "data": facts}
    writer = ExpertCacheWriter([OutputsTarget("val", directory, len(labels), manifest)], dtype)
    predictor = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, callbacks=[writer],
                          default_root_dir=str(directory.parent))
    loader = torch.utils.data.DataLoader(_RowsToPredict(labels), batch_size=1024)
    predictor.predict(ExpertRowsPredictor(experts, phase3.scales, [False]), loader, return_predictions=False)
    return directory


def _cached_outputs(phase3, cfg: ModelConfig, directory: Path, batch: int):
    """`CachedOutputsDataModule` over a fake held-out split of ``phase3_epoch_samples`` rows (the
    scorer's default fitting split, ``scorer.fit_on: heldout``: full logits per expert)."""
    from lpt_lightning.data.cached_outputs import CachedOutputsDataModule

    if not (directory / "manifest.json").is_file():
        labels = np.asarray(torch.randint(0, cfg.num_classes, (cfg.phase3_epoch_samples,),
                                          generator=torch.Generator().manual_seed(1)))
        labels[: cfg.num_classes] = np.arange(cfg.num_classes)  # every class present
        _write_fake_outputs(phase3, directory, labels)
    return CachedOutputsDataModule({"val": directory}, fit_split="val", batch_size=batch, sampling="class_aware")


@contextlib.contextmanager
def _log_replaced(phase3, log):
    """``phase3.log`` for one section: a no-op (a bare step has no trainer) or, with None, the
    class's own (`benchmarks.common.build_phase3` stubs it on the instance for the other timings)."""
    saved = vars(phase3).pop("log", None)
    if log is not None:
        phase3.log = log
    try:
        yield
    finally:
        vars(phase3).pop("log", None)
        if saved is not None:
            phase3.log = saved


def _bench_phase3_steps(phase3, env: C.Env, cfg: ModelConfig, outputs: Path, log) -> list[dict[str, Any]]:
    """Per batch size: ``MoEScorerPhase.training_step`` + backward + AdamW on a batch of cached rows
    (scorer, softmax of both experts' logits, fused NLL; ``self.log`` stubbed), and, timed in the
    same rounds, the batch read the loader does (`CachedOutputsDataset.__getitems__`: a gather of
    fp16 rows from the memory-mapped shards, to float32)."""
    data = _cached_outputs(phase3, cfg, outputs, batch=cfg.phase3_batches[0])
    dataset = data.train_dataloader().dataset.dataset  # StreamBatches -> CachedOutputsDataset
    phase3.to(env.device).train()
    optimizer = phase3.configure_optimizers()
    rows = []
    with _log_replaced(phase3, lambda *args, **kwargs: None):
        for b in cfg.phase3_batches:
            index = torch.randint(0, len(dataset), (b,), generator=torch.Generator().manual_seed(b)).tolist()
            batch = {"cb": {k: v.to(env.device) for k, v in dataset.__getitems__(index).items()}}

            def step(batch=batch):
                with env.autocast():
                    loss = phase3.training_step(batch, 0)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            times = C.time_interleaved({"step": step, "read": lambda index=index: dataset.__getitems__(index)},
                                       max(cfg.rounds, 5) * 4, cfg.warmup + 2, env)
            mem = C.peak_memory(step, env, C.tensors_of(phase3.scorer, optimizer, batch))
            t, read = C.median(times["step"]), C.median(times["read"])
            rows.append({"phase": "phase3", "expert": "scorer", "batch": b, "step_s": t, "step_s_min": min(times["step"]),
                         "step_s_max": max(times["step"]), "images_per_s": b / t, "read_s": read,
                         "read_s_min": min(times["read"]), "read_s_max": max(times["read"]), **mem})
            log(f"  phase3 scorer B={b}: {1000 * t:.2f} ms/step ({b / t:,.0f} samples/s, best "
                f"{1e6 * min(times['step']) / b:.1f} us/sample), batch read {1000 * read:.2f} ms "
                f"(best {1e6 * min(times['read']) / b:.1f} us/sample), {1024 * mem['above_baseline_gib']:.1f} MiB "
                "above scorer + batch")
    return rows


def _bench_phase3_epoch(phase3, env: C.Env, cfg: ModelConfig, outputs: Path, log, batch: int = 64) -> dict[str, Any]:
    """Scorer epochs through Lightning's real loop: `Trainer.fit` of `MoEScorerPhase` on the
    `CachedOutputsDataModule` (class-aware sampler, `TrainingDataLoader` over `StreamBatches`,
    whole-batch memory-mapped reads, training_step with its two ``self.log`` calls, AdamW), on
    ``phase3_epoch_samples`` held-out rows; best of ``phase3_epochs`` epochs. Each epoch is split
    into time inside the training step (Lightning's ``on_train_batch_start`` to ``_end``: forward,
    logging, backward, AdamW) and time between steps (fetching the next batch: sampler, row gather,
    device transfer, loop)."""
    import lightning as L

    data = _cached_outputs(phase3, cfg, outputs, batch)

    class EpochTimer(L.Callback):
        def __init__(self):
            self.epochs: list[tuple[float, float]] = []  # (epoch seconds, seconds inside training steps)

        def on_train_epoch_start(self, trainer, pl_module):
            env.sync()
            self.t0, self.in_steps = time.perf_counter(), 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.s0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            env.sync()
            self.in_steps += time.perf_counter() - self.s0

        def on_train_epoch_end(self, trainer, pl_module):
            env.sync()
            self.epochs.append((time.perf_counter() - self.t0, self.in_steps))

    timer = EpochTimer()
    trainer = L.Trainer(accelerator=env.device.type, devices=1, max_epochs=cfg.phase3_epochs, limit_val_batches=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False,
                        precision="bf16-mixed" if env.precision == "bf16-mixed" else "32-true",
                        callbacks=[timer], default_root_dir=str(outputs.parent), num_sanity_val_steps=0)
    with _log_replaced(phase3, None):  # the real self.log inside the loop
        trainer.fit(phase3, datamodule=data)
    trained = (cfg.phase3_epoch_samples // batch) * batch  # the loader drops the last partial batch
    best, in_steps = min(timer.epochs)
    res = {"samples": cfg.phase3_epoch_samples, "samples_trained": trained, "batch": batch, "epoch_s": best,
           "epochs_s": [e for e, _ in timer.epochs], "s_per_sample": best / trained,
           "in_step_s_per_sample": in_steps / trained, "between_steps_s_per_sample": (best - in_steps) / trained}
    log(f"  phase3 epoch through Lightning, batch {batch}: best of {len(timer.epochs)} epochs {best:.2f} s for "
        f"{trained:,} samples ({1e6 * res['s_per_sample']:.1f} us/sample: {1e6 * res['in_step_s_per_sample']:.1f} "
        f"in the step, {1e6 * res['between_steps_s_per_sample']:.1f} between steps); all epochs "
        + ", ".join(f"{e:.2f}" for e in res["epochs_s"]) + " s")
    return res


def _bench_cost_growth(env: C.Env, cfg: ModelConfig, log) -> list[dict[str, Any]]:
    """Cosine head + A-GCL (forward, backward into the features, SGD step) from 365 to 8,142 classes."""
    from lpt_lightning.losses import AGCLLoss
    from lpt_lightning.models.heads import CosineHead

    setups = {}
    for c in cfg.cost_classes:
        head = CosineHead(768, c).to(env.device).train()
        loss = AGCLLoss(C.class_counts(c, n_max=max(1000, c), n_min=2)).to(env.device).train()
        opt = torch.optim.SGD(head.parameters(), lr=0.01, momentum=0.9, weight_decay=0.01)
        g = torch.Generator().manual_seed(c)
        feats = torch.randn(cfg.cost_batch, 768, generator=g).to(env.device).requires_grad_(True)
        labels = torch.randint(0, c, (cfg.cost_batch,), generator=g).to(env.device)

        def step(head=head, loss=loss, opt=opt, feats=feats, labels=labels):
            with env.autocast():
                value = loss(head(feats), labels)
            value.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            feats.grad = None

        step()  # creates the momentum buffer: part of the resident state below
        setups[c] = (step, [head, loss, opt, feats, labels])
    times = C.time_interleaved({c: s for c, (s, _) in setups.items()}, cfg.cost_rounds, cfg.warmup + 1, env)
    rows = []
    for c, (step, objs) in setups.items():
        mem = C.peak_memory(step, env, C.tensors_of(*objs))
        t = C.median(times[c])
        rows.append({"classes": c, "batch": cfg.cost_batch, "step_s": t, "step_s_min": min(times[c]),
                     "step_s_max": max(times[c]),
                     "state_mib": 3 * c * 768 * 4 / 2 ** 20,  # fp32 weight + grad + momentum
                     "peak_above_baseline_mib": 1024 * mem["above_baseline_gib"], "peak_mib": 1024 * mem["peak_gib"]})
        log(f"  head+loss C={c}: {1000 * t:.2f} ms/step (B={cfg.cost_batch}), state {rows[-1]['state_mib']:.1f} MiB, "
            f"peak +{rows[-1]['peak_above_baseline_mib']:.1f} MiB")
    return rows


SECTIONS = ("experts", "phase3", "cost_growth")


def run(env: C.Env, quick: bool, log=print, experts: tuple[str, ...] = ("visual", "vl"),
        sections: tuple[str, ...] = SECTIONS) -> dict[str, Any]:
    cfg = config_for(env, quick)
    counts = C.class_counts(cfg.num_classes)
    scratch = C.scratch_dir()
    measure_experts = "experts" in sections
    res: dict[str, Any] = {"config": cfg.__dict__}
    t0 = time.perf_counter()
    if measure_experts:
        res |= {"train": [], "prefix_reuse": [], "trainable": {}}
        log("matmul peak ...")
        res["matmul_peak"] = C.matmul_peak(env, quick)
        log(f"  {res['matmul_peak']['flops_per_s'] / 1e9:.1f} GFLOP/s ({res['matmul_peak']})")
        from benchmarks.prototypes import check_exactness

        res["before_fix_exactness"] = check_exactness()
        log(f"library vs before the kept-token fix (small experts, logits and gradients): {res['before_fix_exactness']}")
    checkpoints = {}
    for kind in experts if measure_experts or "phase3" in sections else ():
        log(f"phase 1, {kind} expert (ViT-B/16 shapes, random weights) ...")
        p1 = C.build_phase1(kind, counts)
        if measure_experts:
            res["trainable"][f"phase1 {kind}"] = p1.parameter_report()
            res["train"] += _bench_train(p1, env, cfg, "phase1", kind, log)
            res.setdefault("before_fix_phase1", []).append(
                _oom_guard(lambda: _bench_fast_phase1(p1, env, cfg, kind, log)))
        p1.cpu()
        ckpt1 = C.save_phase_checkpoint(p1, scratch / f"phase1_{kind}.ckpt")
        del p1
        _free()
        log(f"phase 2, {kind} expert ...")
        p2 = C.build_phase2(ckpt1, counts)
        if measure_experts:
            res["trainable"][f"phase2 {kind}"] = p2.parameter_report()
            res["train"] += _bench_train(p2, env, cfg, "phase2", kind, log)
            res["prefix_reuse"].append(_oom_guard(lambda: _bench_prefix_reuse(p2, env, cfg, kind, log)))
        p2.cpu()
        checkpoints[kind] = C.save_phase_checkpoint(p2, scratch / f"phase2_{kind}.ckpt")
        del p2
        _free()
    if set(checkpoints) == {"visual", "vl"}:
        log("phase 3 (both experts frozen + MoE scorer) ...")
        p3 = C.build_phase3(checkpoints["visual"], checkpoints["vl"], counts)
        p3.scorer.w_base.fill_(0.5)
        if measure_experts:
            res["inference"] = _bench_inference(p3, env, cfg, log)
            res["attention_paths"] = _bench_attention_paths(p3, env, cfg, log)
        if "phase3" in sections:
            outputs = scratch / "expert_outputs"
            with C.small_op_threads(env):
                res["phase3_steps"] = _bench_phase3_steps(p3, env, cfg, outputs, log)
                res["phase3_epoch"] = _bench_phase3_epoch(p3, env, cfg, outputs, log)  # the configs' batch (64)
                res["phase3_epoch_large_batch"] = _bench_phase3_epoch(p3, env, cfg, outputs, log, batch=1024)
            shutil.rmtree(outputs)
        del p3
        _free()
    if "cost_growth" in sections:
        log("head + loss cost growth ...")
        with C.small_op_threads(env):
            res["cost_growth"] = _bench_cost_growth(env, cfg, log)
    res["small_op_threads"] = 1 if not env.is_cuda else None
    res["seconds"] = time.perf_counter() - t0
    return res
