"""Accuracy study on CIFAR-10-LT and Fashion-MNIST-LT with the pretrained stand-in experts; writes docs/results.md.

    python benchmarks/accuracy_study.py                    # full study: both datasets, 3 seeds (about 30 min on 2 CPU cores)
    python benchmarks/accuracy_study.py --dataset fmnist   # one dataset: one process per dataset halves the wall time
    python benchmarks/accuracy_study.py --quick            # smoke version: 1 seed, short schedules
    python benchmarks/accuracy_study.py --render           # rewrite docs/results.md from the saved JSON

The experts are the stand-ins of weights/standins/ (benchmarks/pretrain_standins.py, MODEL_CARD.md),
loaded through ``expert.backbone.checkpoint_path``. Every LPT/LPT++ row is a real pipeline phase (one
LightningCLI run each, composed by ``lpt_lightning.pipeline.plan``); the baselines below the
experts (a linear head on raw pixels, head-only linear probes on the frozen stand-in) are trained
here on images or features read through the project's data module. Validation and test images are
exactly those the stand-ins held out in pretraining (checked against heldout_slices.json).
Runs go to the git-ignored ``runs/accuracy_study/``; finished phases are skipped on rerun.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
import yaml  # noqa: E402

ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-train-jpeg.tar.gz"
CIFAR_ROOT = REPO / "data_cache" / "cifar10" / "train"
STANDINS = REPO / "weights" / "standins"
RUNS = REPO / "runs" / "accuracy_study"
RESULTS = REPO / "benchmarks" / "results"
NOTES = RESULTS / "accuracy_notes.md"  # hand-written findings, rendered into the page
DOC = REPO / "docs" / "results.md"
SPLIT_KEYS = ("acc", "acc_many", "acc_medium", "acc_few")
GROUP = {"pool_size": 10, "top_k": 2, "start_block": 3, "length": 4}

DATASETS = {
    "cifar10": {"title": "CIFAR-10-LT",
                "test": "the stand-ins' held-out CIFAR-10 test slice (200 images per class; CIFAR-10's own "
                        "test split is not available here)"},
    "fmnist": {"title": "Fashion-MNIST-LT", "test": "the official t10k test split"},
}


def settings(quick: bool) -> dict[str, Any]:
    # n_max 500: training counts 500 ... 5, so every group has 3-4 classes. Steps, not epochs, set
    # the budget: each epoch is capped at `steps` batches per stream (trainer.limit_train_batches).
    # The Fashion-MNIST test set is a balanced 2,000-image slice of t10k (the size of the CIFAR-10
    # test slice): five test passes per seed over all 10,000 images would double the study's time.
    common = {"n_max": 500, "batch_size": 32, "base_lr": 0.5, "steps": 20, "fmnist_test_per_class": 200,
              "probe_epochs": 30}
    if quick:
        return common | {"mode": "quick", "seeds": [0], "fmnist_test_per_class": 100,
                         "epochs": {"phase1": 1, "phase2": 1, "phase3": 2}}
    return common | {"mode": "full", "seeds": [0, 1, 2], "epochs": {"phase1": 2, "phase2": 1, "phase3": 5}}


# ------------------------------------------------------------------------------------- configs


def standin_backbone(kind: str) -> dict[str, Any]:
    """The stand-in backbone block of configs/expert/standin_<kind>.yaml (one source of truth)."""
    backbone = yaml.safe_load((REPO / "configs" / "expert" / f"standin_{kind}.yaml").read_text())["backbone"]
    backbone["checkpoint_path"] = str(REPO / backbone["checkpoint_path"])  # runs start from any directory
    return backbone


def source_config(dataset: str, s: dict[str, Any]) -> dict[str, Any]:
    """The data source; val/test slices are the stand-ins' held-out ones (100 val, 200 test per class, seed 0)."""
    if dataset == "cifar10":
        return {"class_path": "lpt_lightning.data.ImageFolderSource",
                "init_args": {"root": str(CIFAR_ROOT), "archive": str(ARCHIVE), "imbalance_ratio": 100,
                              "max_per_class": s["n_max"], "val_per_class": 100, "test_per_class": 200, "seed": 0,
                              "name": "cifar10_lt"}}
    return {"class_path": "lpt_lightning.data.FashionMNISTSource",
            "init_args": {"imbalance_ratio": 100, "max_per_class": s["n_max"], "val_per_class": 100,
                          "max_test_per_class": s["fmnist_test_per_class"], "seed": 0}}


def expert(kind: str) -> dict[str, Any]:
    # The visual head starts at the class-mean features (the VL head at the text embeddings): with
    # a few dozen steps a random head would still be far from what the frozen features allow.
    head = {"head_init": "class_mean"} if kind == "visual" else {}
    return {"kind": kind, "backbone": standin_backbone(kind), "prompt_length": 4} | head


def lptpp_config(dataset: str, s: dict[str, Any], seed: int) -> dict[str, Any]:
    """Keyword arguments of ``pipeline.plan`` for the LPT++ run (both experts, phases 1-3)."""
    optim = {"base_lr": s["base_lr"], "warmup_epochs": 0}

    def phase(name: str) -> dict[str, Any]:
        epochs = s["epochs"][name]
        # Validation once, at the end: nothing is selected on it during phases 1 and 2.
        return {"max_epochs": epochs, "check_val_every_n_epoch": epochs}

    return {
        "experts": ["visual", "vl"], "mixture": True, "seed_everything": seed,
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "enable_progress_bar": False,
                    "enable_model_summary": False, "log_every_n_steps": 10, "num_sanity_val_steps": 0,
                    "limit_train_batches": s["steps"]},
        # No random-resized crops: at 32 px they cut away most of the object, and the stand-ins were
        # pretrained on whole images (held-out accuracy of the demo's phase 1: 72% without, 57% with).
        "data": {"source": source_config(dataset, s), "batch_size": s["batch_size"], "eval_batch_size": 500,
                 "num_workers": 1, "persistent_workers": True, "seed": seed, "augment": False},
        "phase1": {"trainer": phase("phase1"), "model": {"optim": optim},
                   "visual": {"expert": expert("visual")}, "vl": {"expert": expert("vl")}},
        "phase2": {"trainer": phase("phase2"), "model": {"group_prompts": GROUP, "optim": optim}},
        "phase3": {"trainer": {"max_epochs": s["epochs"]["phase3"], "limit_train_batches": None},
                   "data": {"sampling": "class_aware"}, "model": {"scorer": {"hidden_dim": 64, "lr": 0.003}}},
    }


def ablation_config(base: dict[str, Any], loss: str, sampling: str) -> dict[str, Any]:
    """Phase 1 of the visual expert with another loss (A-GCL or plain CE) and/or sampling."""
    config = copy.deepcopy(base)
    config.update(experts=["visual"], mixture=False)
    if loss == "ce":  # logit-adjusted CE with tau = 0: plain CE on the s * cos logits
        config["phase1"]["model"]["loss"] = {"kind": "logit_adjusted", "tau": 0.0}
    config["phase1"]["data"] = {"sampling": sampling}
    return config


def scorer_on_train(phase3):
    """Phase 3 again with the scorer fitted on the training split (the ablation), on the same
    experts and their cached held-out/test outputs."""
    from lpt_lightning.pipeline import PhaseRun

    directory = phase3.directory.with_name("phase3_moe_fit_train")
    config = yaml.safe_load(yaml.safe_dump(phase3.config).replace(str(phase3.directory), str(directory)))
    config["model"]["init_args"]["scorer"]["fit_on"] = "train"
    config["model"]["init_args"]["cache_dir"] = str(phase3.directory / "expert_cache")
    return PhaseRun(directory.name, "phase3", directory, config)


# ------------------------------------------------------------------------------------- running


def run_phases(runs: list) -> None:
    """Run pipeline phases in order (finished ones are skipped); each records its wall time."""
    from lpt_lightning.pipeline import _validate_configs, finished, run_phase

    _validate_configs(runs)
    for run in runs:
        if finished(run):
            continue
        print(f"\n##### {run.directory}", flush=True)
        t0 = time.perf_counter()
        run_phase(run, test=True)
        (run.directory / "seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")


def phase_rows(run_dir: Path, name: str) -> dict[str, dict[str, Any]]:
    """Rows of one finished phase: '<row>' -> split accuracies and the phase's wall time."""
    directory = run_dir / name
    data = json.loads((directory / "metrics.json").read_text())
    seconds = float((directory / "seconds.txt").read_text())
    return {row: {k: values[k] for k in SPLIT_KEYS} | {"seconds": seconds} for row, values in data["results"].items()}


def study_runs(dataset: str, s: dict[str, Any], seed: int, seed_dir: Path) -> list:
    """The pipeline phases of one seed: LPT++ (both experts, phase 3), phase 3 with the scorer fitted
    on train, and phase 1 of the visual expert under the three other loss/sampling pairs."""
    from lpt_lightning.pipeline import plan

    base = lptpp_config(dataset, s, seed)
    lptpp = plan(str(seed_dir / "lptpp"), base["data"], base["trainer"], base["experts"], base["phase1"],
                 base["phase2"], base["phase3"], True, seed)
    runs = lptpp + [scorer_on_train(lptpp[-1])]
    for name, loss, sampling in (("ce_dual", "ce", "dual"), ("agcl_instance", "agcl", "instance"),
                                 ("ce_instance", "ce", "instance")):
        config = ablation_config(base, loss, sampling)
        runs += plan(str(seed_dir / name), config["data"], config["trainer"], config["experts"], config["phase1"],
                     config["phase2"], None, False, seed)[:1]
    return runs


def pipeline_rows(seed_dir: Path) -> dict[str, dict[str, Any]]:
    """The rows of one seed's finished phases."""
    main = seed_dir / "lptpp"
    p3 = phase_rows(main, "phase3_moe")
    rows = {
        "phase1": phase_rows(main, "phase1_visual"),
        "phase2": phase_rows(main, "phase2_visual"),
        "vl_phase1": phase_rows(main, "phase1_vl"),
        "vl_phase2": phase_rows(main, "phase2_vl"),
    }
    rows = {key: {"test": r["test"], "val": r["val"]} for key, r in rows.items()}
    for key, title in (("wbase", "W_base fusion"), ("scorer", "LPT++ (scorer)")):
        rows[key] = {"test": p3[f"test: {title}"], "val": p3[f"val: {title}"]}
    fit_train = phase_rows(main, "phase3_moe_fit_train")
    rows["scorer_train"] = {"test": fit_train["test: LPT++ (scorer)"], "val": fit_train["val: LPT++ (scorer)"]}
    for key in ("ce_dual", "agcl_instance", "ce_instance"):
        r = phase_rows(seed_dir / key, "phase1_visual")
        rows[key] = {"test": r["test"], "val": r["val"]}
    rows["agcl_dual"] = rows["phase1"]
    state = torch.load(main / "phase3_moe" / "final.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    rows["_w_base"] = float(state["scorer.w_base"])
    return rows


# ------------------------------------------------------------------------------------- baselines


def build_source(dataset: str, s: dict[str, Any]):
    config = source_config(dataset, s)
    module, name = config["class_path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**config["init_args"])


def check_heldout(dataset: str, splits) -> None:
    """The val/test images must be exactly the ones the stand-ins held out in pretraining."""
    path = STANDINS / "heldout_slices.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found: the stand-ins (make standins) must exist before the study")
    held = json.loads(path.read_text())
    if dataset == "fmnist":
        if sorted(int(i) for i in splits.val.items) != held["fashion_mnist"]["val_indices"]:
            raise SystemExit("Fashion-MNIST val slice differs from the stand-ins' held-out slice")
        return
    for split, key in ((splits.val, "val_files"), (splits.test, "test_files")):
        files = sorted("train/" + str(Path(p).relative_to(CIFAR_ROOT)) for p in split.items)
        if files != sorted(held["cifar10"][key]):
            raise SystemExit(f"CIFAR-10 {key} differ from the stand-ins' held-out slice")


@torch.no_grad()
def frozen_inputs(dataset: str, s: dict[str, Any], cache: Path) -> dict[str, Any]:
    """Raw pixels and frozen stand-in ViT features (the head-only probe's input) of every split,
    through the project's data module (eval transform) and expert classes; cached."""
    if cache.is_file():
        return torch.load(cache, weights_only=True)
    from lpt_lightning.data import LongTailDataModule
    from lpt_lightning.models.backbones import BackboneSpec
    from lpt_lightning.models.expert import ExpertSpec, LongTailExpert

    t0 = time.perf_counter()
    dm = LongTailDataModule(build_source(dataset, s), img_size=32, eval_batch_size=500, num_workers=0)
    check_heldout(dataset, dm.splits)
    spec = ExpertSpec(kind="visual", backbone=BackboneSpec(**standin_backbone("visual")), prompt_length=0,
                      adapters=False)
    vit = LongTailExpert(spec, dm.num_classes).eval()
    out: dict[str, Any] = {"counts": dm.group_class_counts}
    for split in ("train", "val", "test"):
        pixels, features, labels = [], [], []
        for batch in dm.split_dataloader(split):
            pixels.append(batch["image"].float().div(255).flatten(1))  # uint8 from the loader
            features.append(vit(batch["image"]).features)
            labels.append(batch["label"])
        out[split] = {"pixels": torch.cat(pixels), "features": torch.cat(features), "label": torch.cat(labels)}
    out["seconds"] = time.perf_counter() - t0
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, cache)
    return out


def linear_head(inputs: dict[str, Any], key: str, tau: float, seed: int, epochs: int) -> dict[str, Any]:
    """A linear layer on standardised inputs, trained with Adam on instance-sampled minibatches;
    tau > 0 is the logit-adjusted loss (Menon et al. 2021: CE on logits + tau * log prior)."""
    from lpt_lightning.metrics import SplitAccuracy

    t0 = time.perf_counter()
    x, y = inputs["train"][key], inputs["train"]["label"]
    mean, std = x.mean(0), x.std(0) + 1e-6
    counts = torch.as_tensor(inputs["counts"]).float()
    log_prior = tau * torch.log(counts / counts.sum())
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = torch.nn.Linear(x.shape[1], len(counts))
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-3, weight_decay=1e-4)
    with torch.enable_grad():
        for _ in range(epochs):
            for idx in torch.randperm(len(y), generator=generator).split(128):
                loss = torch.nn.functional.cross_entropy(head((x[idx] - mean) / std) + log_prior, y[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    result = {}
    for split in ("test", "val"):
        metric = SplitAccuracy(inputs["counts"])
        with torch.no_grad():
            metric.update(head((inputs[split][key] - mean) / std), inputs[split]["label"])
        result[split] = {k: float(v) for k, v in metric.compute().items() if k in SPLIT_KEYS}
        result[split]["seconds"] = time.perf_counter() - t0
    return result


def baseline_rows(inputs: dict[str, Any], s: dict[str, Any], seed: int) -> dict[str, dict[str, Any]]:
    epochs = s["probe_epochs"]
    return {"pixels": linear_head(inputs, "pixels", 1.0, seed, epochs),
            "probe_ce": linear_head(inputs, "features", 0.0, seed, epochs),
            "probe_la": linear_head(inputs, "features", 1.0, seed, epochs)}


# ------------------------------------------------------------------------------------- report

# (key, label) of the main table, top to bottom.
MAIN_ROWS = [
    ("pixels", "linear head on raw pixels (logit-adjusted CE)"),
    ("probe_ce", "head-only linear probe on the frozen stand-in, CE + instance sampling"),
    ("probe_la", "head-only linear probe on the frozen stand-in, logit-adjusted CE"),
    ("phase1", "visual expert, phase 1 (shared prompt + adapters + cosine head; A-GCL, dual sampling)"),
    ("phase2", "visual expert, phase 2 (+ group prompts)"),
    ("vl_phase1", "VL expert, phase 1"),
    ("vl_phase2", "VL expert, phase 2"),
    ("wbase", "W_base fusion (phase 3, searched on the held-out split)"),
    ("scorer", "LPT++: learned scorer, fitted on the held-out split"),
]
ABLATION_ROWS = [
    ("agcl_dual", "A-GCL + dual sampling (the method)"),
    ("ce_dual", "CE + dual sampling"),
    ("agcl_instance", "A-GCL + instance sampling"),
    ("ce_instance", "CE + instance sampling"),
]
SCORER_ROWS = [
    ("scorer", "scorer fitted on the held-out split (default)"),
    ("scorer_train", "scorer fitted on the training split (ablation)"),
]
# Paired differences (same seed): label, a, b; "_best" = the better phase-2 expert of that seed.
DIFFS = [
    ("A-GCL + dual minus CE + instance (phase 1)", "agcl_dual", "ce_instance"),
    ("A-GCL minus CE (dual sampling, phase 1)", "agcl_dual", "ce_dual"),
    ("dual minus instance sampling (A-GCL, phase 1)", "agcl_dual", "agcl_instance"),
    ("phase 2 minus phase 1 (visual)", "phase2", "phase1"),
    ("phase 1 minus head-only probe (logit-adjusted)", "phase1", "probe_la"),
    ("head-only probe (logit-adjusted) minus raw pixels", "probe_la", "pixels"),
    ("probe: logit-adjusted minus CE + instance", "probe_la", "probe_ce"),
    ("W_base fusion minus the better expert", "wbase", "_best"),
    ("learned scorer minus the better expert", "scorer", "_best"),
    ("learned scorer minus W_base fusion", "scorer", "wbase"),
    ("scorer fitted on held-out minus on train", "scorer", "scorer_train"),
]


def _row(seed_rows: dict[str, Any], key: str, split: str = "test") -> dict[str, float] | None:
    if key == "_best":
        experts = [seed_rows[k][split] for k in ("phase2", "vl_phase2") if k in seed_rows]
        return max(experts, key=lambda r: r["acc"]) if experts else None
    return seed_rows.get(key, {}).get(split)


def _values(payload: dict[str, Any], key: str, metric: str, split: str = "test") -> list[float]:
    vals = [(_row(rows, key, split) or {}).get(metric) for rows in payload["runs"].values()]
    return [v for v in vals if v is not None and not math.isnan(v)]


def _diffs(payload: dict[str, Any], a: str, b: str, metric: str) -> list[float]:
    out = []
    for rows in payload["runs"].values():
        ra, rb = _row(rows, a), _row(rows, b)
        if ra and rb and not (math.isnan(ra[metric]) or math.isnan(rb[metric])):
            out.append(ra[metric] - rb[metric])
    return out


def _ms(values: list[float], signed: bool = False) -> str:
    if not values:
        return "n/a"
    mean = statistics.mean(values)
    text = f"{mean:+.1f}" if signed else f"{mean:.1f}"
    return text + (f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else "")


def verdict(values: list[float]) -> str:
    """Sign of a paired difference against its seed spread."""
    if len(values) < 2:
        return "one seed"
    mean, std = statistics.mean(values), statistics.stdev(values)
    if mean - std > 0:
        return "higher"
    if mean + std < 0:
        return "lower"
    return "no clear difference"


def _table(payload: dict[str, Any], rows: list[tuple[str, str]], with_time: bool = True) -> list[str]:
    head = "| configuration | overall | many | medium | few | val overall |" + (" s / seed |" if with_time else "")
    lines = [head, "| --- | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if with_time else "")]
    for key, label in rows:
        cells = [_ms(_values(payload, key, k)) for k in SPLIT_KEYS] + [_ms(_values(payload, key, "acc", "val"))]
        if with_time:
            seconds = _values(payload, key, "seconds")
            cells.append(f"{statistics.mean(seconds):.0f}" if seconds else "n/a")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def hypotheses(payload: dict[str, Any]) -> list[str]:
    """The hypotheses of the study, each with the paired differences that test it."""
    def d(a: str, b: str, metric: str) -> str:
        vals = _diffs(payload, a, b, metric)
        return f"{_ms(vals, signed=True)} ({verdict(vals)})"

    return [
        f"- *A-GCL + dual sampling raise few-shot accuracy far above CE + instance sampling without lowering "
        f"overall accuracy* (phase 1): few {d('agcl_dual', 'ce_instance', 'acc_few')}, overall "
        f"{d('agcl_dual', 'ce_instance', 'acc')}, many {d('agcl_dual', 'ce_instance', 'acc_many')}.",
        f"- *phase 2 >= phase 1 >= head-only probe > raw pixels*: phase 2 minus phase 1 {d('phase2', 'phase1', 'acc')}; "
        f"phase 1 minus the logit-adjusted probe {d('phase1', 'probe_la', 'acc')}; that probe minus raw pixels "
        f"{d('probe_la', 'pixels', 'acc')} (overall accuracy).",
        f"- *fusion >= the better expert*: W_base fusion minus the better phase-2 expert {d('wbase', '_best', 'acc')}; "
        f"learned scorer minus the better expert {d('scorer', '_best', 'acc')}.",
    ]


def render(payloads: list[dict[str, Any]]) -> str:
    card = STANDINS / "standins.json"
    lines = [
        "# Accuracy study: CIFAR-10-LT and Fashion-MNIST-LT with pretrained stand-in experts",
        "",
        "Generated by `python benchmarks/accuracy_study.py` from `benchmarks/results/accuracy_*.json` "
        "(`--render` rewrites this page without running anything). Every number is top-1 accuracy in percent "
        "on a balanced test set of images the stand-in experts never saw. LPT/LPT++ rows come from the real "
        "`lpt pipeline` phases (one LightningCLI run each); the baselines above them are linear heads trained "
        "by the study script on the same images (raw pixels) or on the frozen stand-in's features.",
        "",
        "## The experts",
        "",
        "No hub weights can be downloaded here, so both experts are **stand-ins pretrained by the project** "
        "(`benchmarks/pretrain_standins.py`, `weights/standins/MODEL_CARD.md`): a timm ViT (patch 4, width 96, "
        "6 blocks, 0.46M parameters) trained supervised, and an open_clip CLIP of the same image-tower size "
        "trained contrastively on \"a photo of a {class}.\" captions. **They saw the balanced training splits "
        "of Fashion-MNIST and CIFAR-10 with labels** (20 classes together), as the reference ViT-B/16 saw "
        "ImageNet-21k, which contains ImageNet-LT's classes. The long-tailed training sets here are subsets "
        "of what they were pretrained on; the validation and test images are not: they were held out before "
        "pretraining (`heldout_slices.json`; the study checks that its slices are exactly those). The frozen "
        "features therefore already carry class information, and the question each row answers is what the "
        "trainable parts make of a long-tailed sample of them.",
        "",
    ]
    if card.is_file():
        acc = json.loads(card.read_text())

        def own(key: str, dataset: str) -> str:
            return f"{100 * acc[key]['val_accuracy'][dataset]['accuracy_own_10_classes']:.1f}%"

        cells = [f"{name}: Fashion-MNIST {own(key, 'fashion_mnist')}, CIFAR-10 {own(key, 'cifar10')}"
                 for key, name in (("vit", "ViT (its 20-class head)"), ("clip", "CLIP (zero-shot)"))]
        lines += [f"Stand-in accuracy on the held-out val slices, within each dataset's 10 classes: "
                  f"{'; '.join(cells)}.", ""]
    if NOTES.is_file():
        lines += [NOTES.read_text().rstrip(), ""]
    for payload in payloads:
        s = payload["settings"]
        ds = DATASETS[payload["dataset"]]
        quick = s["mode"] == "quick"
        lines += [f"## {ds['title']}" + (" (quick mode: a smoke run, NOT a result)" if quick else ""), ""]
        lines += [
            f"- Command: `{payload['command']}`; wall time {payload['seconds'] / 60:.1f} min ({payload['date']}, "
            f"load average at start {payload['load_average']}; {s['threads']} torch thread).",
            f"- Data: balanced held-out slices first (100 val images per class: the only split anything is "
            f"selected or fitted on), then the CIFAR-LT profile with imbalance ratio 100 and n_max = {s['n_max']}: "
            f"training counts {payload['class_counts']}. Groups (LPT convention): many n > 100, medium "
            f"20 < n <= 100, few n <= 20. Test: {ds['test']}"
            + (f", capped at {s['fmnist_test_per_class']} per class" if payload["dataset"] == "fmnist"
               and s["fmnist_test_per_class"] else "") + f" ({payload['test_images']:,} images).",
            f"- Schedules: phase 1 {s['epochs']['phase1']} epochs, phase 2 {s['epochs']['phase2']}, each epoch "
            f"{s['steps']} steps of {s['batch_size']} images per stream; SGD base_lr {s['base_lr']} (lr "
            f"{s['base_lr'] * s['batch_size'] / 256:g}), no warm-up, cosine; reference A-GCL constants; prompt "
            f"length 4, group pool 10 (top 2, from block {GROUP['start_block'] + 1}); phase 3: "
            f"{s['epochs']['phase3']} epochs of the scorer (hidden 64). Linear heads: Adam lr 1e-3, "
            f"{s['probe_epochs']} epochs, batches of 128.",
            f"- Seeds {s['seeds']}: the training seed (samplers, initialisation, dropout, A-GCL noise); the data split "
            f"and the frozen experts are fixed. Cells are mean ± sample standard deviation over seeds; "
            "'s / seed' is the wall time of the run that produced the row (W_base and the scorer share one "
            "phase-3 run; the probes add a one-off feature pass of "
            f"{payload['feature_seconds']:.0f} s).",
            "",
            "### Main rows", "", *_table(payload, MAIN_ROWS), "",
            "### Loss and sampling (visual expert, phase 1)", "", *_table(payload, ABLATION_ROWS), "",
            "### Where the scorer is fitted", "", *_table(payload, SCORER_ROWS), "",
            "### Paired differences (percentage points, same seed)", "",
            "| comparison | overall | many | medium | few |", "| --- | ---: | ---: | ---: | ---: |",
        ]
        for label, a, b in DIFFS:
            lines.append(f"| {label} | " + " | ".join(_ms(_diffs(payload, a, b, k), signed=True)
                                                    for k in SPLIT_KEYS) + " |")
        w = [rows["_w_base"] for rows in payload["runs"].values() if "_w_base" in rows]
        lines += ["", f"Searched W_base (weight of the visual expert) per seed: {', '.join(f'{x:.2f}' for x in w)}.",
                  "", "### Hypotheses against the data", "",
                  "Verdicts compare the mean paired difference with its seed standard deviation "
                  "(higher / lower: the mean is more than one standard deviation away from zero).", "",
                  *hypotheses(payload), ""]
    return "\n".join(lines).rstrip() + "\n"


def result_files() -> list[Path]:
    order = {"full": 0, "quick": 1}
    files = [p for p in RESULTS.glob("accuracy_*_*.json")]
    return sorted(files, key=lambda p: (order.get(p.stem.split("_")[1], 2), p.stem))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, short schedules")
    parser.add_argument("--dataset", choices=sorted(DATASETS), nargs="*", default=sorted(DATASETS))
    parser.add_argument("--seeds", type=int, nargs="*", help="override the seeds")
    parser.add_argument("--render", action="store_true", help="only rewrite docs/results.md from saved JSON")
    parser.add_argument("--fresh", action="store_true", help="delete this mode's earlier runs first")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine 2 threads stall on small ops)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.render:
        s = settings(args.quick) | {"threads": args.threads}
        if args.seeds:
            s["seeds"] = args.seeds
        for dataset in args.dataset:
            mode_dir = RUNS / s["mode"] / dataset
            if args.fresh and mode_dir.exists():
                import shutil

                shutil.rmtree(mode_dir)
            t0, load = time.perf_counter(), round(os.getloadavg()[0], 2)
            inputs = frozen_inputs(dataset, s, mode_dir / "frozen_inputs.pt")
            phases = [run for seed in s["seeds"] for run in study_runs(dataset, s, seed, mode_dir / f"seed{seed}")]
            # Visual-expert phases of every seed first (a stable sort), then the VL expert and phase 3.
            run_phases(sorted(phases, key=lambda run: run.name.endswith("_vl") or run.phase == "phase3"))
            runs = {str(seed): baseline_rows(inputs, s, seed) | pipeline_rows(mode_dir / f"seed{seed}")
                    for seed in s["seeds"]}
            payload = {"dataset": dataset, "settings": s, "runs": runs,
                       "class_counts": [int(c) for c in inputs["counts"]], "test_images": len(inputs["test"]["label"]),
                       "feature_seconds": inputs["seconds"], "seconds": time.perf_counter() - t0,
                       "load_average": load, "date": time.strftime("%Y-%m-%d"),
                       "command": "python benchmarks/accuracy_study.py" + (" --quick" if args.quick else "")
                       + f" --dataset {dataset}"}
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / f"accuracy_{s['mode']}_{dataset}.json").write_text(json.dumps(payload, indent=1))
            print(f"\naccuracy study ({s['mode']}, {dataset}) finished in {payload['seconds'] / 60:.1f} min")
    payloads = [json.loads(p.read_text()) for p in result_files()]
    DOC.write_text(render(payloads))
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
