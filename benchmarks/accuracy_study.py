"""Accuracy study on CIFAR-10-LT and Fashion-MNIST-LT with the pretrained stand-in experts; writes docs/results.md.

    python benchmarks/accuracy_study.py                    # full study: both datasets, 3 seeds (about 30 min on 2 CPU cores)
    python benchmarks/accuracy_study.py --dataset fmnist   # one dataset: one process per dataset halves the wall time
    python benchmarks/accuracy_study.py --quick            # smoke version: 1 seed, short schedules
    python benchmarks/accuracy_study.py --reevaluate       # test evaluation of the finished runs again (new metrics)
    python -m benchmarks.report --render                   # rewrite docs/results.md (and the other pages) from the JSON

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

from benchmarks.common import template  # noqa: E402
from lpt_lightning.checkpoints import load_checkpoint_file  # noqa: E402
from lpt_lightning.metrics import EXTRA_KEYS, METRIC_NAMES, SPLIT_KEYS, WORST_CLASS_KEYS, shot_groups  # noqa: E402

ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-train-jpeg.tar.gz"
CIFAR_ROOT = REPO / "data_cache" / "cifar10" / "train"
STANDINS = REPO / "weights" / "standins"
RUNS = REPO / "runs" / "accuracy_study"
RESULTS = REPO / "benchmarks" / "results"
NOTES = RESULTS / "accuracy_notes.md"  # hand-written findings, rendered into the page
NOTES_DIAGNOSIS = RESULTS / "diagnosis_notes.md"  # hand-written reading of the diagnosis
DOC = REPO / "docs" / "results.md"
GROUP = {"pool_size": 10, "top_k": 2, "start_block": 3, "length": 4}

DATASETS = {
    "cifar10": {"title": "CIFAR-10-LT",
                "test": "the stand-ins' held-out CIFAR-10 test slice (500 images per class; CIFAR-10's own "
                        "test split is not available here)"},
    "fmnist": {"title": "Fashion-MNIST-LT", "test": "the official t10k test split"},
}


def settings(quick: bool) -> dict[str, Any]:
    # n_max 500: training counts 500 ... 5, so every group has 3-4 classes. Steps, not epochs, set
    # the budget: each epoch is capped at `steps` batches per stream (trainer.limit_train_batches).
    # Each run pairs a training seed with a class order (which classes are head and which tail):
    # the canonical one (class 0 the head) and two seeded permutations, so that group accuracy is
    # not one fixed set of easy or hard tail classes. Fashion-MNIST tests on the whole t10k split.
    common = {"n_max": 500, "batch_size": 32, "base_lr": 0.5, "steps": 20, "fmnist_test_per_class": None,
              "probe_epochs": 30, "bootstrap": 2000}
    if quick:
        return common | {"mode": "quick", "seeds": [0], "class_orders": [None], "fmnist_test_per_class": 100,
                         "epochs": {"phase1": 1, "phase2": 1, "phase3": 2}}
    return common | {"mode": "full", "seeds": [0, 1, 2], "class_orders": [None, 1, 2],
                     "epochs": {"phase1": 2, "phase2": 1, "phase3": 5}}


# ------------------------------------------------------------------------------------- configs


def standin_backbone(kind: str) -> dict[str, Any]:
    """The stand-in backbone block of configs/expert/standin_<kind>.yaml (one source of truth), with
    its weights file taken from the stand-ins folder of this study (``--standins``)."""
    backbone = yaml.safe_load((REPO / "configs" / "expert" / f"standin_{kind}.yaml").read_text())["backbone"]
    backbone["checkpoint_path"] = str(STANDINS / Path(backbone["checkpoint_path"]).name)
    return backbone


def heldout() -> dict[str, Any]:
    path = STANDINS / "heldout_slices.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found: the stand-ins (make standins) must exist before the study")
    return json.loads(path.read_text())


def source_config(dataset: str, s: dict[str, Any], class_order_seed: int | None = None) -> dict[str, Any]:
    """The data source: val/test slices and the long-tail pool are the ones the stand-ins held out of
    pretraining (their heldout_slices.json), so no image of the task was seen in pretraining."""
    held = heldout()
    if dataset == "cifar10":
        info = held["cifar10"]
        return {"class_path": "lpt_lightning.data.ImageFolderSource",
                "init_args": {"root": str(CIFAR_ROOT), "archive": str(ARCHIVE), "imbalance_ratio": 100,
                              "max_per_class": s["n_max"], "val_per_class": info["val_per_class"],
                              "test_per_class": info["test_per_class"],
                              "train_pool_per_class": info.get("train_pool_per_class"), "seed": held["seed"],
                              "class_order_seed": class_order_seed, "name": "cifar10_lt"}}
    info = held["fashion_mnist"]
    return {"class_path": "lpt_lightning.data.FashionMNISTSource",
            "init_args": {"imbalance_ratio": 100, "max_per_class": s["n_max"], "val_per_class": info["val_per_class"],
                          "max_test_per_class": s["fmnist_test_per_class"],
                          "train_pool_per_class": info.get("train_pool_per_class"), "seed": held["seed"],
                          "class_order_seed": class_order_seed}}


def expert(kind: str) -> dict[str, Any]:
    # The visual head starts at the class-mean features (the VL head at the text embeddings): with
    # a few dozen steps a random head would still be far from what the frozen features allow.
    head = {"head_init": "class_mean"} if kind == "visual" else {}
    return {"kind": kind, "backbone": standin_backbone(kind), "prompt_length": 4} | head


def lptpp_config(dataset: str, s: dict[str, Any], seed: int, class_order_seed: int | None = None) -> dict[str, Any]:
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
        # pretrained on whole images (held-out accuracy of the demo's phase 1 with the first stand-ins: 72% without, 57% with).
        "data": {"source": source_config(dataset, s, class_order_seed), "batch_size": s["batch_size"], "eval_batch_size": 500,
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
    from lpt_lightning.pipeline_plan import PhaseRun

    directory = phase3.directory.with_name("phase3_moe_fit_train")
    config = yaml.safe_load(yaml.safe_dump(phase3.config).replace(str(phase3.directory), str(directory)))
    config["model"]["init_args"]["scorer"]["fit_on"] = "train"
    config["model"]["init_args"]["cache_dir"] = str(phase3.directory / "expert_cache")
    return PhaseRun(directory.name, "phase3", directory, config)


# ------------------------------------------------------------------------------------- running


def run_phases(runs: list) -> None:
    """Run pipeline phases in order (finished ones are skipped); each records its wall time."""
    from lpt_lightning.pipeline import run_phase
    from lpt_lightning.pipeline_state import _validate_configs, finished

    _validate_configs(runs)
    for run in runs:
        if finished(run):
            continue
        print(f"\n##### {run.directory}", flush=True)
        t0 = time.perf_counter()
        run_phase(run, test=True)
        (run.directory / "seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")


def phase_rows(run_dir: Path, name: str) -> dict[str, dict[str, Any]]:
    """Rows of one finished phase: '<row>' -> its metrics (those its metrics.json has), per-class
    accuracies and the phase's wall time."""
    directory = run_dir / name
    data = json.loads((directory / "metrics.json").read_text())
    seconds = float((directory / "seconds.txt").read_text())
    return {row: {k: values[k] for k in (*SPLIT_KEYS, *EXTRA_KEYS, *WORST_CLASS_KEYS, "per_class") if k in values}
            | {"seconds": seconds} for row, values in data["results"].items()}


def reevaluate(dataset: str) -> None:
    """The test evaluation of every finished phase of the full study again, from its final.ckpt and
    start.ckpt (no training: the pipeline's own reporting), so that each metrics.json has the
    metrics added since it ran; then the stored JSON's pipeline rows gain them. Top-1 figures that
    differ from the stored ones are listed in the JSON (they must not)."""
    from lpt_lightning.pipeline import PhaseRun, reevaluate_phase

    path = RESULTS / f"accuracy_full_{dataset}.json"
    payload = json.loads(path.read_text())
    t0, differences = time.perf_counter(), []
    for seed, stored in payload["runs"].items():
        seed_dir = RUNS / "full" / dataset / f"seed{seed}"
        for final in sorted(seed_dir.glob("*/*/final.ckpt")):
            metrics = json.loads((final.parent / "metrics.json").read_text())["results"]
            if all("balanced_acc" in row for row in metrics.values()):
                continue  # re-evaluated already
            print(f"\n##### re-evaluating {final.parent}", flush=True)
            reevaluate_phase(PhaseRun(final.parent.name, final.parent.name.split("_")[0], final.parent, {}))
        for key, row in pipeline_rows(seed_dir).items():
            if key.startswith("_"):
                continue
            for split, values in row.items():
                old = stored[key][split]
                differences += [f"seed {seed} {key} {split} {k}: {old[k]} -> {values[k]}"
                                for k in (*SPLIT_KEYS, "per_class") if values[k] != old[k]]
                old |= {k: v for k, v in values.items() if k not in (*SPLIT_KEYS, "per_class", "seconds")}
    payload["reevaluation"] = {"seconds": time.perf_counter() - t0, "date": time.strftime("%Y-%m-%d"),
                               "command": f"python benchmarks/accuracy_study.py --reevaluate --dataset {dataset}",
                               "top1_differences": differences}
    path.write_text(json.dumps(payload, indent=1))
    print(f"re-evaluated {dataset} in {payload['reevaluation']['seconds'] / 60:.1f} min; "
          f"{len(differences)} top-1 differences", *differences, sep="\n")


def study_runs(dataset: str, s: dict[str, Any], seed: int, class_order_seed: int | None, seed_dir: Path) -> list:
    """The pipeline phases of one run: LPT++ (both experts, phase 3), phase 3 with the scorer fitted
    on train, and phase 1 of the visual expert under the three other loss/sampling pairs."""
    from lpt_lightning.pipeline_plan import plan

    base = lptpp_config(dataset, s, seed, class_order_seed)
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
    starts = {"vis_start": phase_rows(main, "phase1_visual"), "vl_start": phase_rows(main, "phase1_vl")}
    rows = {
        **starts,
        "phase1": phase_rows(main, "phase1_visual"),
        "phase2": phase_rows(main, "phase2_visual"),
        "vl_phase1": phase_rows(main, "phase1_vl"),
        "vl_phase2": phase_rows(main, "phase2_vl"),
    }
    rows = {key: ({"test": r["test: no training"], "val": r["val: no training"]} if key in starts
                  else {"test": r["test"], "val": r["val"]}) for key, r in rows.items()}
    from lpt_lightning.phases.moe_scorer import row_name

    # Phase 3's val rows are on the split W_base was searched on (named so): the study's "val" column.
    for key, title in (("wbase", "W_base fusion"), ("scorer", "LPT++ (scorer)")):
        rows[key] = {"test": p3[row_name("test", title)], "val": p3[row_name("val", title)]}
    fit_train = phase_rows(main, "phase3_moe_fit_train")
    rows["scorer_train"] = {"test": fit_train[row_name("test", "LPT++ (scorer)")],
                            "val": fit_train[row_name("val", "LPT++ (scorer)")]}
    for key in ("ce_dual", "agcl_instance", "ce_instance"):
        r = phase_rows(seed_dir / key, "phase1_visual")
        rows[key] = {"test": r["test"], "val": r["val"]}
    rows["agcl_dual"] = rows["phase1"]
    state = load_checkpoint_file(main / "phase3_moe" / "final.ckpt")["state_dict"]
    rows["_w_base"] = float(state["scorer.w_base"])
    return rows


# ------------------------------------------------------------------------------------- baselines


def build_source(dataset: str, s: dict[str, Any], class_order_seed: int | None = None):
    config = source_config(dataset, s, class_order_seed)
    module, name = config["class_path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**config["init_args"])


def check_heldout(dataset: str, splits) -> None:
    """The val/test images must be exactly the ones the stand-ins held out in pretraining, and the
    long-tailed training images must come from the pool they held out too."""
    held = heldout()
    if dataset == "fmnist":
        info = held["fashion_mnist"]
        if sorted(int(i) for i in splits.val.items) != info["val_indices"]:
            raise SystemExit("Fashion-MNIST val slice differs from the stand-ins' held-out slice")
        if "pool_indices" in info and not {int(i) for i in splits.train.items} <= set(info["pool_indices"]):
            raise SystemExit("Fashion-MNIST training images outside the stand-ins' held-out pool")
        return
    info = held["cifar10"]

    def files(split) -> list[str]:
        return sorted("train/" + str(Path(p).relative_to(CIFAR_ROOT)) for p in split.items)

    for split, key in ((splits.val, "val_files"), (splits.test, "test_files")):
        if files(split) != sorted(info[key]):
            raise SystemExit(f"CIFAR-10 {key} differ from the stand-ins' held-out slice")
    if "pool_files" in info and not set(files(splits.train)) <= set(info["pool_files"]):
        raise SystemExit("CIFAR-10 training images outside the stand-ins' held-out pool")


@torch.no_grad()
def frozen_inputs(dataset: str, s: dict[str, Any], class_order_seed: int | None, cache: Path) -> dict[str, Any]:
    """Raw pixels and frozen stand-in ViT features (the head-only probe's input) of every split,
    through the project's data module (eval transform) and expert classes; cached."""
    if cache.is_file():
        return torch.load(cache, weights_only=True)
    from lpt_lightning.data import LongTailDataModule
    from lpt_lightning.models.backbones import BackboneSpec
    from lpt_lightning.models.expert import ExpertSpec, LongTailExpert

    t0 = time.perf_counter()
    dm = LongTailDataModule(build_source(dataset, s, class_order_seed), img_size=32, eval_batch_size=500,
                            num_workers=0)
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
        computed = metric.compute()
        result[split] = {k: float(computed[k]) for k in SPLIT_KEYS}
        result[split]["per_class"] = [float(x) for x in computed["per_class"]]
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
    ("vis_start", "visual expert, **no training** (frozen stand-in, class-mean head)"),
    ("vl_start", "VL expert, **no training** (frozen stand-in, zero-shot text head)"),
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
# Paired differences (same run): label, a, b; "_best" = the better phase-2 expert of that run,
# "_start" = the better no-training row of that run.
DIFFS = [
    ("LPT++ minus the better no-training row", "scorer", "_start"),
    ("visual expert: phase 1 minus no training", "phase1", "vis_start"),
    ("VL expert: phase 1 minus no training", "vl_phase1", "vl_start"),
    ("phase 2 minus phase 1 (visual)", "phase2", "phase1"),
    ("phase 2 minus phase 1 (VL)", "vl_phase2", "vl_phase1"),
    ("W_base fusion minus the better expert", "wbase", "_best"),
    ("learned scorer minus the better expert", "scorer", "_best"),
    ("learned scorer minus W_base fusion", "scorer", "wbase"),
    ("A-GCL + dual minus CE + instance (phase 1)", "agcl_dual", "ce_instance"),
    ("A-GCL minus CE (dual sampling, phase 1)", "agcl_dual", "ce_dual"),
    ("dual minus instance sampling (A-GCL, phase 1)", "agcl_dual", "agcl_instance"),
    ("phase 1 minus head-only probe (logit-adjusted)", "phase1", "probe_la"),
    ("head-only probe (logit-adjusted) minus raw pixels", "probe_la", "pixels"),
    ("scorer fitted on held-out minus on train", "scorer", "scorer_train"),
]
# Phase-1 variants of the diagnosis (``--diagnosis``): key, label, overrides of the phase-1 config
# (``model``: AdaptPhase init args, ``data``, ``trainer``, ``expert``: ExpertSpec fields). Each changes one thing
# of the study's recipe, from the same start.
VARIANTS = [
    ("default", "the study's recipe: A-GCL, dual sampling, base_lr 0.5, prompts + adapters + head", {}),
    ("ce", "loss: plain CE", {"model": {"loss": {"kind": "logit_adjusted", "tau": 0.0}}}),
    ("la", "loss: logit-adjusted CE (tau 1)", {"model": {"loss": {"kind": "logit_adjusted", "tau": 1.0}}}),
    ("agcl_no_noise", "loss: A-GCL without its noise (beta 0)", {"model": {"loss": {"beta": 0.0}}}),
    ("agcl_no_margin", "loss: A-GCL without its margin (m 0)", {"model": {"loss": {"margin": 0.0}}}),
    ("instance", "sampling: instance only", {"data": {"sampling": "instance"}}),
    ("class_balanced", "sampling: class-balanced only", {"data": {"sampling": "class_aware"}}),
    ("lr_x0.1", "lr x0.1 (base_lr 0.05)", {"model": {"optim": {"base_lr": 0.05}}}),
    ("head_only", "trained: head only (no prompts, no adapters)", {"expert": {"prompt_length": 0, "adapters": False}}),
    ("head_prompts", "trained: head + prompts (no adapters)", {"expert": {"adapters": False}}),
    ("scale_10", "head logit scale 10 (20 by default)", {"model": {"loss": {"scale": 10.0}}}),
    ("head_lr_x0.1", "head lr x0.1 (optim.head_lr_scale 0.1)", {"model": {"optim": {"head_lr_scale": 0.1}}}),
    ("head_fixed", "head fixed at its start (optim.head_lr_scale 0)", {"model": {"optim": {"head_lr_scale": 0.0}}}),
    ("head_anchor", "penalty toward the starting head (loss.head_anchor 10)", {"model": {"loss": {"head_anchor": 10.0}}}),
    ("steps_x4", "budget x4 (2 epochs of 80 steps)", {"trainer": {"limit_train_batches": 80}}),
]


# ------------------------------------------------------------------------------------- statistics


def _row(run_rows: dict[str, Any], key: str, split: str = "test") -> dict[str, Any] | None:
    if key in ("_best", "_start"):
        keys = ("phase2", "vl_phase2") if key == "_best" else ("vis_start", "vl_start")
        rows = [run_rows[k][split] for k in keys if k in run_rows]
        return max(rows, key=lambda r: r["acc"]) if rows else None
    return run_rows.get(key, {}).get(split)


def _values(payload: dict[str, Any], key: str, metric: str, split: str = "test") -> list[float]:
    vals = [(_row(rows, key, split) or {}).get(metric) for rows in payload["runs"].values()]
    return [v for v in vals if v is not None and not math.isnan(v)]


def _ms(values: list[float], signed: bool = False, digits: int = 1) -> str:
    if not values:
        return "n/a"
    mean = statistics.mean(values)
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return text + (f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")


def group_masks(counts: list[int]) -> dict[str, torch.Tensor]:
    """All classes, then the LPT groups of the training counts (`lpt_lightning.metrics.shot_groups`)."""
    groups = shot_groups(counts)
    return {"acc": torch.ones(len(counts), dtype=torch.bool), **{f"acc_{g}": m for g, m in groups.items()}}


def bootstrap(payload: dict[str, Any], a: str, b: str | None = None, split: str = "test") -> dict[str, tuple]:
    """Mean and 95 % interval of row ``a`` (or of the paired difference a - b) for each split key,
    by a bootstrap over runs (seed + class order, resampled) and test images (each class's correct
    count redrawn from Binomial(n_c, p_c)). For a difference, the two rows' counts are redrawn
    independently: their errors are positively correlated on the same images, so this overstates
    the spread and the interval is conservative."""
    runs = [r for r in payload["runs"].values() if _row(r, a, split) and (b is None or _row(r, b, split))]
    if not runs:
        return {}
    n = torch.tensor(payload["test_per_class"] if split == "test" else payload["val_per_class"], dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    draws = payload["settings"].get("bootstrap", 2000)

    def per_run(run: dict, key: str) -> torch.Tensor:
        return torch.tensor(_row(run, key, split)["per_class"], dtype=torch.float64).nan_to_num(0.0) / 100

    stats = {k: [] for k in SPLIT_KEYS}
    masks = [group_masks(run["_class_counts"]) for run in runs]
    for _ in range(draws):
        picks = torch.randint(len(runs), (len(runs),), generator=generator).tolist()
        sums = {k: 0.0 for k in SPLIT_KEYS}
        for i in picks:
            acc = torch.binomial(n, per_run(runs[i], a), generator=generator) / n
            if b is not None:
                acc = acc - torch.binomial(n, per_run(runs[i], b), generator=generator) / n
            for k, mask in masks[i].items():
                sums[k] += float(acc[mask].mean()) if mask.any() else float("nan")
        for k in SPLIT_KEYS:
            stats[k].append(100 * sums[k] / len(picks))
    out = {}
    for k in SPLIT_KEYS:
        values = torch.tensor(stats[k])
        values = values[~values.isnan()]
        if len(values):
            point = statistics.mean(_row(r, a, split)[k] - (_row(r, b, split)[k] if b else 0.0) for r in runs)
            out[k] = (point, float(values.quantile(0.025)), float(values.quantile(0.975)))
    return out


def _ci(cell: tuple | None, signed: bool = False) -> str:
    if not cell:
        return "n/a"
    point, lo, hi = cell
    fmt = "{:+.1f}" if signed else "{:.1f}"
    return f"{fmt.format(point)} [{fmt.format(lo)}, {fmt.format(hi)}]"


def _table(payload: dict[str, Any], rows: list[tuple[str, str]], with_time: bool = True) -> list[str]:
    head = "| configuration | overall | many | medium | few | val overall |" + (" s / run |" if with_time else "")
    lines = [head, "| --- | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if with_time else "")]
    for key, label in rows:
        ci = bootstrap(payload, key)
        cells = [_ci(ci.get(k)) for k in SPLIT_KEYS] + [_ms(_values(payload, key, "acc", "val"))]
        if with_time:
            seconds = _values(payload, key, "seconds")
            cells.append(f"{statistics.mean(seconds):.0f}" if seconds else "n/a")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def metrics_table(payload: dict[str, Any]) -> list[str]:
    """The further metrics (`METRIC_NAMES`) of the rows whose stored test results have them (the
    pipeline's; the baselines report top-1 only): mean ± standard deviation over runs."""
    rows = [(key, label) for key, label in MAIN_ROWS if _values(payload, key, "balanced_acc")]
    if not rows:
        return []
    lines = [template("results", "metrics"), "", "| configuration | " + " | ".join(METRIC_NAMES) + " |",
             "| --- |" + " ---: |" * len(METRIC_NAMES)]
    for key, label in rows:
        lines.append(f"| {label} | " + " | ".join(_ms(_values(payload, key, m), digits=2 if m == "nll" else 1)
                                                   for m in METRIC_NAMES) + " |")
    return lines + [""]


def targets(payload: dict[str, Any]) -> list[str]:
    """The study's goals, each checked against its 95 % interval."""
    gain = bootstrap(payload, "scorer", "_start")
    lines = []
    if gain:
        overall, few = gain["acc"], gain.get("acc_few")
        lines.append(f"- LPT++ beats the better no-training row by >= 5 points overall: {_ci(overall, True)} -> "
                     f"**{'met' if overall[0] >= 5 and overall[1] > 0 else 'missed'}**; and is not below it on "
                     f"few-shot: {_ci(few, True)} -> **{'met' if few and few[1] > 0 else 'missed' if few and few[2] < 0 else 'not shown (the interval holds 0)'}**.")
    for label, a, b in (("visual expert, phase 1 >= its no-training row", "phase1", "vis_start"),
                        ("VL expert, phase 1 >= its no-training row", "vl_phase1", "vl_start"),
                        ("visual expert, phase 2 >= phase 1", "phase2", "phase1"),
                        ("VL expert, phase 2 >= phase 1", "vl_phase2", "vl_phase1"),
                        ("W_base fusion >= the better expert", "wbase", "_best"),
                        ("learned scorer >= the better expert", "scorer", "_best")):
        d = bootstrap(payload, a, b).get("acc")
        if d:
            verdict = "above" if d[1] > 0 else "below" if d[2] < 0 else "no difference shown"
            lines.append(f"- {label}: {_ci(d, True)} overall ({verdict}).")
    return lines


# ------------------------------------------------------------------------------------- report


def _data_lines(payload: dict[str, Any]) -> list[str]:
    s = payload["settings"]
    ds = DATASETS[payload["dataset"]]
    orders = "; ".join(f"run {key}: seed {run['_seed']}, class order {run['_class_order'] or 'canonical'} "
                       f"(counts by class {run['_class_counts']})" for key, run in payload["runs"].items())
    return [template("results", "data", command=payload["command"], minutes=f"{payload['seconds'] / 60:.1f}",
                     date=payload["date"], load=payload["load_average"], threads=s["threads"],
                     val=payload["val_per_class"][0], n_max=s["n_max"],
                     counts=sorted(payload["class_counts"], reverse=True), test=ds["test"],
                     test_images=f"{payload['test_images']:,}", orders=orders, epochs1=s["epochs"]["phase1"],
                     epochs2=s["epochs"]["phase2"], steps=s["steps"], batch=s["batch_size"], base_lr=s["base_lr"],
                     lr=f"{s['base_lr'] * s['batch_size'] / 256:g}", block=GROUP["start_block"] + 1,
                     epochs3=s["epochs"]["phase3"], probe_epochs=s["probe_epochs"], draws=s.get("bootstrap", 2000))]


def render(payloads: list[dict[str, Any]], diagnoses: list[dict[str, Any]], demo: dict[str, Any] | None = None) -> str:
    card = STANDINS / "standins.json"
    lines = [template("results", "intro"), ""]
    if card.is_file():
        acc = json.loads(card.read_text())
        zs = acc.get("clip", {}).get("val_accuracy", {})
        if zs and "zero_shot_own_10_classes" in zs.get("cifar10", {}):
            lines += [template("results", "zero_shot",
                               fmnist=f"{100 * zs['fashion_mnist']['zero_shot_own_10_classes']:.1f}",
                               cifar=f"{100 * zs['cifar10']['zero_shot_own_10_classes']:.1f}"), ""]
    if demo:
        from benchmarks.demo import results_section

        lines += results_section(demo)
    if NOTES.is_file():
        lines += [NOTES.read_text().rstrip(), ""]
    for payload in payloads:
        s = payload["settings"]
        ds = DATASETS[payload["dataset"]]
        quick = s["mode"] == "quick"
        lines += [f"## {ds['title']}" + (" (quick mode: a smoke run, NOT a result)" if quick else ""), ""]
        lines += [*_data_lines(payload), "",
                  "### Targets", "", *targets(payload), "",
                  "### Main rows", "", *_table(payload, MAIN_ROWS), "", *metrics_table(payload),
                  "### Paired differences (percentage points, same run)", "",
                  "| comparison | overall | many | medium | few |", "| --- | ---: | ---: | ---: | ---: |"]
        for label, a, b in DIFFS:
            ci = bootstrap(payload, a, b)
            lines.append(f"| {label} | " + " | ".join(_ci(ci.get(k), True) for k in SPLIT_KEYS) + " |")
        w = [rows["_w_base"] for rows in payload["runs"].values() if "_w_base" in rows]
        lines += ["", f"Searched W_base (weight of the visual expert) per run: {', '.join(f'{x:.2f}' for x in w)}.", "",
                  "### Loss and sampling (visual expert, phase 1)", "", *_table(payload, ABLATION_ROWS), "",
                  "### Where the scorer is fitted", "", *_table(payload, SCORER_ROWS), ""]
    if diagnoses and NOTES_DIAGNOSIS.is_file():
        lines += [NOTES_DIAGNOSIS.read_text().rstrip(), ""]
    for diag in diagnoses:
        lines += render_diagnosis(diag)
    return "\n".join(lines).rstrip() + "\n"


def render_diagnosis(diag: dict[str, Any]) -> list[str]:
    s = diag["settings"]
    which = ("the first stand-ins, pretrained with the target labels on the balanced splits that hold every "
             "long-tailed training image (`weights/standins/` of commit 350f9f7)"
             if diag["standins"].endswith("_old") else "the rebuilt stand-ins")
    lines = [f"## Diagnosis, {DATASETS[diag['dataset']]['title']}: {which}", "",
             f"- Command: `{diag['command']}`; {diag['seconds'] / 60:.1f} min of runs in all ({diag['date']}).",
             f"- Stand-ins: `{diag['standins']}`; test: {diag['test_images']:,} images; seeds {s['seeds']} "
             "(canonical class order); phase 1 only, the study's schedule; each row changes one thing of the "
             "study's recipe. Cells: test accuracy minus the expert's no-training row, mean [95 % bootstrap "
             "interval]; the same on the held-out val split (where a choice may be made; mean over seeds); "
             "then two classes' test accuracy before -> after.", ""]
    names = diag["class_names"]
    for kind, title in (("vl", "VL expert"), ("visual", "visual expert")):
        if kind not in diag["experts"]:
            continue
        runs = diag["experts"][kind]
        start = runs["default"]["runs"]
        lines += [f"### {title}: no-training row "
                  f"{_ms([r['start']['acc'] for r in start.values()])} overall, "
                  f"{_ms([r['start']['acc_few'] for r in start.values()])} few", "",
                  "| variant | overall | many | medium | few | val overall | " + " | ".join(diag["watch"]) + " |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |" + " ---: |" * len(diag["watch"])]
        for key, label, _ in VARIANTS:
            if key not in runs:
                continue
            payload = {"runs": {k: {"a": {"test": r["test"]}, "b": {"test": r["start"]}, "_class_counts": diag["class_counts"]}
                                for k, r in runs[key]["runs"].items()},
                       "test_per_class": diag["test_per_class"], "settings": s}
            ci = bootstrap(payload, "a", "b")
            watch = []
            for cls in diag["watch"]:
                c = names.index(cls)
                before = statistics.mean(r["start"]["per_class"][c] for r in runs[key]["runs"].values())
                after = statistics.mean(r["test"]["per_class"][c] for r in runs[key]["runs"].values())
                watch.append(f"{before:.0f} -> {after:.0f}")
            val = [r["val"]["acc"] - r["val_start"]["acc"] for r in runs[key]["runs"].values() if "val_start" in r]
            lines.append(f"| {label} | " + " | ".join(_ci(ci.get(k), True) for k in SPLIT_KEYS) + " | "
                         + (f"{statistics.mean(val):+.1f}" if val else "n/a") + " | " + " | ".join(watch) + " |")
        lines.append("")
        default = runs["default"]["runs"]
        lines += [f"Per class, {title}, the study's recipe (test accuracy, mean over seeds):", "",
                  "| class | training images | no training | phase 1 | change |", "| --- | ---: | ---: | ---: | ---: |"]
        for c, name in enumerate(names):
            before = statistics.mean(r["start"]["per_class"][c] for r in default.values())
            after = statistics.mean(r["test"]["per_class"][c] for r in default.values())
            lines.append(f"| {name} | {diag['class_counts'][c]} | {before:.1f} | {after:.1f} | {after - before:+.1f} |")
        lines.append("")
    return lines


# ------------------------------------------------------------------------------------- diagnosis


def diagnosis_runs(dataset: str, s: dict[str, Any], kind: str, key: str, seed: int, run_dir: Path) -> list:
    """Phase 1 of one expert with one variant of the recipe."""
    from lpt_lightning.pipeline_plan import merge, plan

    overrides = next(v for k, _, v in VARIANTS if k == key)
    base = lptpp_config(dataset, s, seed)
    phase1 = copy.deepcopy(base["phase1"])
    phase1["model"] = merge(phase1["model"], overrides.get("model"))
    phase1["data"] = merge(phase1.get("data") or {}, overrides.get("data"))
    phase1["trainer"] = merge(phase1.get("trainer") or {}, overrides.get("trainer"))
    phase1[kind]["expert"] = merge(phase1[kind]["expert"], overrides.get("expert"))
    return plan(str(run_dir), base["data"], base["trainer"], [kind], phase1, base["phase2"], None, False, seed)[:1]


def diagnose(dataset: str, s: dict[str, Any], args) -> dict[str, Any]:
    mode_dir = RUNS / f"diagnosis_{STANDINS.name}" / dataset
    plans = {}
    # Seed by seed: stopped early (--collect), the table still has every variant of the first seeds.
    for seed in s["seeds"]:
        for kind in args.experts:
            for key, _, _ in VARIANTS:
                if args.variants and key not in args.variants:
                    continue
                plans[(kind, key, seed)] = diagnosis_runs(dataset, s, kind, key, seed, mode_dir / kind / key / f"seed{seed}")
    if not args.collect:
        run_phases([run for runs in plans.values() for run in runs])
    experts: dict[str, Any] = {}
    for (kind, key, seed), runs in plans.items():
        if not (runs[0].directory / "seconds.txt").is_file():
            continue
        rows = phase_rows(runs[0].directory.parent, runs[0].name)
        experts.setdefault(kind, {}).setdefault(key, {"runs": {}})["runs"][str(seed)] = {
            "test": rows["test"], "start": rows["test: no training"], "val": rows["val"],
            "val_start": rows["val: no training"], "seconds": rows["test"]["seconds"]}
    metrics = json.loads((plans[(args.experts[0], "default", s["seeds"][0])][0].directory / "metrics.json").read_text())
    source = build_source(dataset, s).load()
    return {"dataset": dataset, "standins": str(STANDINS.relative_to(REPO)) if STANDINS.is_relative_to(REPO) else STANDINS.name,
            "settings": s, "experts": experts, "class_names": metrics["class_names"],
            "class_counts": metrics["class_counts"],
            "test_per_class": [int(x) for x in torch.bincount(torch.as_tensor(source.test.labels))],
            "test_images": len(source.test.labels), "watch": args.watch,
            "seconds": sum(r["seconds"] for runs in experts.values() for v in runs.values() for r in v["runs"].values()),
            "date": time.strftime("%Y-%m-%d"),
            "command": f"python benchmarks/accuracy_study.py --diagnosis --dataset {dataset} --standins {args.standins}"
                       + (f" --variants {' '.join(args.variants)}" if args.variants else "")
                       + (f" --watch {' '.join(args.watch)}" if args.watch != ["cat", "truck"] else "")}


# ------------------------------------------------------------------------------------- main


def result_files() -> list[Path]:
    order = {"full": 0, "quick": 1}
    files = [p for p in RESULTS.glob("accuracy_*_*.json")]
    return sorted(files, key=lambda p: (order.get(p.stem.split("_")[1], 2), p.stem))


def diagnosis_files() -> list[Path]:
    """The first stand-ins' diagnosis (the regression's cause) first, then the rebuilt ones'."""
    return sorted(RESULTS.glob("diagnosis_*.json"), key=lambda p: (not p.stem.endswith("_old"), p.stem))


def render_page() -> str:
    """docs/results.md from the stored results."""
    from benchmarks.demo import DEMO

    payloads = [json.loads(p.read_text()) for p in result_files()]
    diagnoses = [json.loads(p.read_text()) for p in diagnosis_files()]
    return render(payloads, diagnoses, json.loads(DEMO.read_text()) if DEMO.is_file() else None)


def main(argv: list[str] | None = None) -> None:
    global STANDINS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, short schedules")
    parser.add_argument("--dataset", choices=sorted(DATASETS), nargs="*", default=sorted(DATASETS))
    parser.add_argument("--seeds", type=int, nargs="*", help="override the seeds")
    parser.add_argument("--render", action="store_true", help="only rewrite docs/results.md from saved JSON")
    parser.add_argument("--reevaluate", action="store_true",
                        help="test evaluation of the finished full-study phases again (new metrics), no training")
    parser.add_argument("--fresh", action="store_true", help="delete this mode's earlier runs first")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine 2 threads stall on small ops)")
    parser.add_argument("--standins", default="weights/standins",
                        help="folder of the stand-in weights and their heldout_slices.json (relative to the repository)")
    parser.add_argument("--diagnosis", action="store_true",
                        help="phase 1 of each expert under each variant of VARIANTS, from the same start")
    parser.add_argument("--experts", nargs="*", default=["vl", "visual"], help="experts of the diagnosis")
    parser.add_argument("--watch", nargs="*", default=["cat", "truck"], help="classes the diagnosis follows")
    parser.add_argument("--collect", action="store_true", help="diagnosis: only collect the finished runs")
    parser.add_argument("--variants", nargs="*", help="diagnosis: only these variants (default: all)")
    args = parser.parse_args(argv)
    STANDINS = REPO / args.standins
    torch.set_num_threads(args.threads)
    if args.reevaluate:
        for dataset in args.dataset:
            reevaluate(dataset)
    elif args.diagnosis:
        s = settings(False) | {"threads": args.threads, "class_orders": [None]}
        if args.seeds:
            s["seeds"] = args.seeds
        for dataset in args.dataset:
            diag = diagnose(dataset, s, args)
            (RESULTS / f"diagnosis_{dataset}_{STANDINS.name}.json").write_text(json.dumps(diag, indent=1))
    elif not args.render:
        s = settings(args.quick) | {"threads": args.threads}
        if args.seeds:
            s["seeds"] = args.seeds
            s["class_orders"] = (s["class_orders"] * len(args.seeds))[:len(args.seeds)]
        for dataset in args.dataset:
            mode_dir = RUNS / s["mode"] / dataset
            if args.fresh and mode_dir.exists():
                import shutil

                shutil.rmtree(mode_dir)
            t0, load = time.perf_counter(), round(os.getloadavg()[0], 2)
            pairs = list(zip(s["seeds"], s["class_orders"]))
            run_dirs = {seed: mode_dir / f"seed{seed}" for seed, _ in pairs}
            phases = [run for seed, order in pairs for run in study_runs(dataset, s, seed, order, run_dirs[seed])]
            # Visual-expert phases of every run first (a stable sort), then the VL expert and phase 3.
            run_phases(sorted(phases, key=lambda run: run.name.endswith("_vl") or run.phase == "phase3"))
            runs, feature_seconds = {}, 0.0
            for seed, order in pairs:
                inputs = frozen_inputs(dataset, s, order, run_dirs[seed] / "frozen_inputs.pt")
                feature_seconds += inputs["seconds"]
                runs[str(seed)] = baseline_rows(inputs, s, seed) | pipeline_rows(run_dirs[seed]) | {
                    "_seed": seed, "_class_order": order, "_class_counts": [int(c) for c in inputs["counts"]]}
            labels = {split: torch.bincount(inputs[split]["label"]).tolist() for split in ("val", "test")}
            payload = {"dataset": dataset, "settings": s, "runs": runs,
                       "class_counts": [int(c) for c in inputs["counts"]], "test_images": len(inputs["test"]["label"]),
                       "test_per_class": labels["test"], "val_per_class": labels["val"],
                       "feature_seconds": feature_seconds, "seconds": time.perf_counter() - t0,
                       "load_average": load, "date": time.strftime("%Y-%m-%d"),
                       "command": "python benchmarks/accuracy_study.py" + (" --quick" if args.quick else "")
                       + f" --dataset {dataset}"}
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / f"accuracy_{s['mode']}_{dataset}.json").write_text(json.dumps(payload, indent=1))
            print(f"\naccuracy study ({s['mode']}, {dataset}) finished in {payload['seconds'] / 60:.1f} min")
    DOC.write_text(render_page())
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
