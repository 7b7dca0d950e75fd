"""`lpt pipeline` end to end on tiny experts; reruns, resume, phase 3 rows, predict and export."""
import copy
import csv
import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml

from lpt_lightning.checkpoints import expert_from_checkpoint, load_checkpoint_file
from lpt_lightning.cli import main
from lpt_lightning.errors import ConfigError
from lpt_lightning.pipeline import run_pipeline
from lpt_lightning.pipeline_plan import plan
from tiny_models import CLIP_TINY, TIMM_TINY
from datasets_available import needs_fmnist

pytestmark = needs_fmnist

TINY = {
    "experts": ["visual", "vl"],
    "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "enable_progress_bar": False,
                "enable_model_summary": False, "log_every_n_steps": 5},
    "data": {"source": {"class_path": "lpt_lightning.data.FashionMNISTSource",
                        "init_args": {"imbalance_ratio": 10, "max_per_class": 40, "val_per_class": 5,
                                      "max_test_per_class": 10}},
             "batch_size": 16, "num_workers": 0},
    "phase1": {"trainer": {"max_epochs": 2}, "model": {"optim": {"base_lr": 0.5, "warmup_epochs": 0}},
               "visual": {"expert": {"kind": "visual", "prompt_length": 3,
                                     "backbone": {"name": "vit_base_patch16_224", "pretrained": False,
                                                  "model_kwargs": TIMM_TINY}}},
               "vl": {"expert": {"kind": "vl", "prompt_length": 3,
                                 "backbone": {"pretrained": None, "model_kwargs": CLIP_TINY}}}},
    "phase2": {"trainer": {"max_epochs": 2},
               "model": {"group_prompts": {"pool_size": 6, "top_k": 2, "start_block": 2, "length": 3},
                         "optim": {"base_lr": 0.5, "warmup_epochs": 0}}},
    "phase3": {"trainer": {"max_epochs": 2}, "data": {"sampling": "class_aware"},
               "model": {"scorer": {"hidden_dim": 16}}},
}


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    config = dict(copy.deepcopy(TINY), run_dir=str(root / "run"))
    config_path = root / "pipeline.yaml"
    config_path.write_text(yaml.safe_dump(config))
    main(["pipeline", "--config", str(config_path)])  # through the real command
    return root / "run", config_path


def test_pipeline_leaves_every_phase_with_results(finished_run):
    run_dir, _ = finished_run
    for phase in ("phase1_visual", "phase2_visual", "phase1_vl", "phase2_vl", "phase3_moe"):
        d = run_dir / phase
        assert (d / "final.ckpt").is_file() and (d / "config.yaml").is_file()
        assert (d / "per_class_accuracy.png").read_bytes()[:4] == b"\x89PNG"
        test_row = "test_lpt_scorer" if phase == "phase3_moe" else "test"
        for kind in ("reliability", "confusion"):  # a picture per test row
            assert test_row in {p.stem for p in (d / kind).glob("*.png")}
        metrics = json.loads((d / "metrics.json").read_text())
        assert {"top5", "balanced_acc", "worst_class", "hmean", "gmean", "macro_f1", "nll", "ece_few",
                "reliability"} <= set(metrics["results"]["test"] if "test" in metrics["results"]
                                      else metrics["results"]["test: LPT++ (scorer)"])
        assert metrics["split_convention"] == "lpt" and len(metrics["class_counts"]) == 10
        assert load_checkpoint_file(d / "final.ckpt")["lpt"]["phase"] in ("adapt", "group_prompt", "moe_scorer")
    # Phase 3 reports every part, its val rows named as the split W_base was searched and the scorer
    # fitted on, and its expert rows are exactly phase 2's own test numbers.
    rows = json.loads((run_dir / "phase3_moe" / "metrics.json").read_text())["results"]
    assert set(rows) == {f"{s}: {r}" for s in ("fit split (val)", "test") for r in
                         ("visual expert", "vision-language expert", "W_base fusion", "LPT++ (scorer)")}
    for expert, title in (("visual", "visual expert"), ("vl", "vision-language expert")):
        own = json.loads((run_dir / f"phase2_{expert}" / "metrics.json").read_text())["results"]["val"]
        assert rows[f"fit split (val): {title}"] == own
    for expert, title in (("visual", "visual expert"), ("vl", "vision-language expert")):
        own = json.loads((run_dir / f"phase2_{expert}" / "metrics.json").read_text())["results"]["test"]
        assert rows[f"test: {title}"] == own
    # Phase 1 reports its expert before training, read back from start.ckpt: the tensors as they
    # stood before the first step (the head at its initialisation), which final.ckpt carries too.
    for expert in ("visual", "vl"):
        d = run_dir / f"phase1_{expert}"
        own = json.loads((d / "metrics.json").read_text())["results"]
        assert {"val", "test", "val: no training", "test: no training"} <= set(own)
        start = load_checkpoint_file(d / "start.ckpt")["state_dict"]
        final = load_checkpoint_file(d / "final.ckpt")
        assert final["lpt_start_state"].keys() == start.keys()
        assert all(torch.equal(final["lpt_start_state"][k], start[k]) for k in start)
        assert not torch.equal(start["expert.head.weight"], final["state_dict"]["expert.head.weight"])
        # and logged under their own keys (W&B and CSV alike), beside the trained model's
        logged = set().union(*(set(next(csv.reader(f.open()))) for f in (d / "logs").rglob("metrics.csv")))
        assert {"no_training/val/acc", "no_training/test/acc_few", "val/acc"} <= logged
        assert own["test: no training"]["acc"] == pytest.approx(
            float(next(r for f in (d / "logs").rglob("metrics.csv") for r in csv.DictReader(f.open())
                       if r.get("no_training/test/acc"))["no_training/test/acc"]), abs=1e-3)
    # The pipeline's own table: every expert before training, after phase 1 and 2, then the fusions.
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert list(summary["results"])[:8] == [f"test: {t}, {stage}" for t in ("visual expert", "vision-language expert")
                                            for stage in ("no training", "phase 1", "phase 2")] + [
        "test: W_base fusion", "test: LPT++ (scorer)"]
    assert list(summary["results"])[-2:] == ["fit split (val): W_base fusion", "fit split (val): LPT++ (scorer)"]
    assert summary["results"]["fit split (val): W_base fusion"] == rows["fit split (val): W_base fusion"]
    assert summary["results"]["test: LPT++ (scorer)"]["balanced_acc"] == rows["test: LPT++ (scorer)"]["balanced_acc"]
    assert summary["results"]["test: vision-language expert, no training"] == \
        json.loads((run_dir / "phase1_vl" / "metrics.json").read_text())["results"]["test: no training"]
    cache = list((run_dir / "phase3_moe" / "expert_cache").iterdir())
    # The scorer is fitted on the held-out split: no inference pass over the training images; the
    # test split is evaluated on its images (both experts and the scorer), once.
    assert {p.name.split("-")[0] for p in cache} == {"val"}


def test_compare_reads_the_pipeline_and_a_phase_with_their_digests(finished_run, tmp_path):
    run_dir, _ = finished_run
    main(["compare", str(run_dir), str(run_dir / "phase3_moe"), "--csv", str(tmp_path / "c.csv")])
    rows = {(r["run"], r["row"]): r for r in csv.DictReader((tmp_path / "c.csv").open())}
    summary = json.loads((run_dir / "metrics.json").read_text())["results"]
    assert len(rows) == len(summary) + 8
    scorer = rows[(str(run_dir), "test: LPT++ (scorer)")]
    assert float(scorer["acc"]) == summary["test: LPT++ (scorer)"]["acc"]
    # Each row names the checkpoint file whose weights it evaluated (sha256, 12 hex digits).
    for row, file in (("test: LPT++ (scorer)", "phase3_moe/final.ckpt"),
                      ("test: visual expert, phase 2", "phase2_visual/final.ckpt"),
                      ("test: vision-language expert, no training", "phase1_vl/start.ckpt")):
        assert rows[(str(run_dir), row)]["checkpoint_sha256"] == digest(run_dir / file)[:12]
    assert rows[(str(run_dir / "phase3_moe"), "test: visual expert")]["checkpoint_sha256"] == \
        digest(run_dir / "phase2_visual" / "final.ckpt")[:12]
    held_out = load_checkpoint_file(run_dir / "phase3_moe" / "final.ckpt")["lpt"]["data"]["val"]
    assert {(r["held_out_digest"], r["split_convention"]) for r in rows.values()} == {(held_out, "lpt")}
    assert len({r["test_digest"] for r in rows.values()}) == 1


def test_rerun_skips_every_finished_phase(finished_run, caplog):
    run_dir, config_path = finished_run
    before = {p: p.stat().st_mtime_ns for p in run_dir.glob("*/final.ckpt")}
    with caplog.at_level("INFO"):
        main(["pipeline", "--config", str(config_path)])
    assert {p: p.stat().st_mtime_ns for p in run_dir.glob("*/final.ckpt")} == before
    assert caplog.text.count("finished earlier") == 5


def test_rerun_with_other_settings_is_refused_naming_them(finished_run, capsys, caplog):
    """A finished phase is kept only with the settings its config.yaml recorded: changed ones are
    refused before anything is written, naming each key; logging and loader settings do not count."""
    run_dir, config_path = finished_run
    records = {p: p.read_bytes() for p in run_dir.glob("*/config.yaml")}
    finals = {p: digest(p) for p in run_dir.glob("*/final.ckpt")}
    with pytest.raises(SystemExit) as exit:
        main(["pipeline", "--config", str(config_path), "--phase2.trainer.max_epochs=3",
              "--phase1.model.optim.base_lr=0.1"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "Traceback" not in err
    assert f"phase1_visual ({run_dir}/phase1_visual/config.yaml):\n  model.init_args.optim.base_lr: 0.5 -> 0.1" in err
    assert "phase2_vl (" in err and "trainer.max_epochs: 2 -> 3" in err and "phase3_moe" not in err
    assert "--redo_from=phase1_visual" in err
    assert {p: p.read_bytes() for p in run_dir.glob("*/config.yaml")} == records
    assert {p: digest(p) for p in run_dir.glob("*/final.ckpt")} == finals
    assert not list(run_dir.glob("*/.config.new-*"))
    with caplog.at_level("INFO"):
        main(["pipeline", "--config", str(config_path), "--data.verify_images=full",
              "--trainer.enable_model_summary=true"])
    assert caplog.text.count("finished earlier") == 5


def test_redo_from_trains_that_phase_and_the_later_ones_again(tmp_path):
    config = copy.deepcopy(TINY)
    config["experts"], config["mixture"] = ["visual"], False  # LPT mode: phases 1 and 2
    run_dir = tmp_path / "run"
    run_pipeline(run_dir=str(run_dir), **config)
    phase1, phase2 = run_dir / "phase1_visual", run_dir / "phase2_visual"
    kept = digest(phase1 / "final.ckpt")
    config["phase2"]["trainer"]["max_epochs"] = 3
    with pytest.raises(ConfigError, match=r"(?s)phase2_visual .*trainer.max_epochs: 2 -> 3.*--redo_from=phase2_visual"):
        run_pipeline(run_dir=str(run_dir), **config)
    assert load_checkpoint_file(phase2 / "final.ckpt")["epoch"] == 2
    with pytest.raises(ConfigError, match="--redo_from=phase3_moe: not a phase of this pipeline; choose one of "
                                          "phase1_visual, phase2_visual"):
        run_pipeline(run_dir=str(run_dir), redo_from="phase3_moe", **config)
    run_pipeline(run_dir=str(run_dir), redo_from="phase2_visual", **config)
    assert digest(phase1 / "final.ckpt") == kept
    assert load_checkpoint_file(phase2 / "final.ckpt")["epoch"] == 3
    assert yaml.safe_load((phase2 / "config.yaml").read_text())["trainer"]["max_epochs"] == 3
    run_pipeline(run_dir=str(run_dir), **config)  # the new settings are the recorded ones now


def test_predict_writes_top_k_with_names_and_fused_confidence(finished_run, tmp_path, monkeypatch):
    from PIL import Image

    from lpt_lightning.data import FashionMNISTSource

    run_dir, _ = finished_run
    splits = FashionMNISTSource().load()
    images = tmp_path / "images"
    images.mkdir()
    for i in splits.test.items[:5]:
        Image.fromarray(splits.images[i]).save(images / f"{i}.png")
    out = tmp_path / "preds.csv"
    phase3 = run_dir / "phase3_moe"
    main(["predict", "--config", str(phase3 / "config.yaml"), "--ckpt_path", str(phase3 / "final.ckpt"),
          "--data.predict_paths", str(images), "--prediction.output", str(out), "--prediction.top_k", "3"])
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 5 and list(rows[0])[:4] == ["image", "top1_class", "top1_name", "top1_confidence"]
    for row in rows:
        confidences = [float(row[f"top{k}_confidence"]) for k in (1, 2, 3)]
        assert confidences == sorted(confidences, reverse=True) and 0 < sum(confidences) <= 1 + 1e-6
        assert row["top1_name"] == splits.class_names[int(row["top1_class"])]
    json_out = tmp_path / "preds.json"
    main(["predict", "--config", str(phase3 / "config.yaml"), "--ckpt_path", str(phase3 / "final.ckpt"),
          "--data.predict_paths", str(images), "--prediction.output", str(json_out)])
    records = json.loads(json_out.read_text())
    assert len(records) == 5 and len(records[0]["classes"]) == 5


def test_safetensors_export_round_trip(finished_run, tmp_path):
    run_dir, _ = finished_run
    ckpt = run_dir / "phase2_visual" / "final.ckpt"
    out = tmp_path / "visual.safetensors"
    main(["export", str(ckpt), str(out)])
    assert out.stat().st_size < 500_000
    exported, original = load_checkpoint_file(out), load_checkpoint_file(ckpt)
    assert exported["lpt"] == original["lpt"]
    a = expert_from_checkpoint(original, ckpt).eval()
    b = expert_from_checkpoint(exported, out).eval()
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a(images).logits, b(images).logits)


def test_interrupted_phase_resumes_and_keeps_earlier_phases(tmp_path, caplog):
    config = copy.deepcopy(TINY)
    config["experts"], config["mixture"] = ["visual"], False  # LPT mode: no phase 3
    config["phase2"]["trainer"]["max_epochs"] = 3
    crashing = copy.deepcopy(config)
    crashing["phase2"]["trainer"]["callbacks"] = [{"class_path": "pipeline_helpers.CrashAt",
                                                   "init_args": {"epoch": 1, "batch": 1}}]
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated node failure"):
        run_pipeline(run_dir=str(run_dir), **crashing)
    phase1 = run_dir / "phase1_visual" / "final.ckpt"
    phase1_digest = digest(phase1)
    assert (run_dir / "phase2_visual" / "checkpoints" / "last.ckpt").is_file()
    assert not (run_dir / "phase2_visual" / "final.ckpt").exists()
    with caplog.at_level("INFO"):
        run_pipeline(run_dir=str(run_dir), **config)
    assert "resuming from" in caplog.text and "phase1_visual: finished earlier" in caplog.text
    assert digest(phase1) == phase1_digest
    final = load_checkpoint_file(run_dir / "phase2_visual" / "final.ckpt")
    assert final["epoch"] == 3 and final["lpt"]["phase"] == "group_prompt"  # all 3 epochs done
    assert not (run_dir / "phase3_moe").exists()


def test_plan_hands_each_final_checkpoint_to_the_next_phase(tmp_path):
    runs = plan(str(tmp_path), TINY["data"], TINY["trainer"], ["visual", "vl"], TINY["phase1"], TINY["phase2"],
                TINY["phase3"], True, 0)
    assert [r.name for r in runs] == ["phase1_visual", "phase2_visual", "phase1_vl", "phase2_vl", "phase3_moe"]
    by_name = {r.name: r.config for r in runs}
    assert by_name["phase2_vl"]["model"]["init_args"]["phase1_checkpoint"] == str(tmp_path / "phase1_vl" / "final.ckpt")
    p3 = by_name["phase3_moe"]["model"]["init_args"]
    assert p3["visual_checkpoint"] == str(tmp_path / "phase2_visual" / "final.ckpt")
    assert by_name["phase3_moe"]["data"]["sampling"] == "class_aware" and "sampling" not in by_name["phase1_vl"]["data"]
    assert by_name["phase1_vl"]["model"]["init_args"]["expert"]["kind"] == "vl"
    assert by_name["phase1_visual"]["trainer"]["default_root_dir"] == str(tmp_path / "phase1_visual")
    # One record of the image check for the whole run: later phases skip it.
    assert {r.config["data"]["verify_record_dir"] for r in runs} == {str(tmp_path / "verified")}


def test_expert_blocks_and_phase_overrides_compose_each_phase(tmp_path):
    """An expert's block merges over the phase's model (its expert over model.expert, its optim over
    model.optim); a phase's data naming another source class replaces the shared source (the init
    args are the other class's); a trainer whose logger is None, as the pipeline's parser gives every
    trainer argument, gets the pipeline's loggers."""
    phase1 = copy.deepcopy(TINY["phase1"])
    phase1["model"]["expert"] = {"head_dropout": 0.0}
    phase1["vl"]["optim"] = {"base_lr": 0.1}
    phase3 = copy.deepcopy(TINY["phase3"])
    lists = {"class_path": "lpt_lightning.data.AnnotationListSource", "init_args": {"root": "/lists", "train_list": "t.txt"}}
    phase3["data"]["source"] = lists
    runs = {r.name: r.config for r in plan(str(tmp_path), TINY["data"], TINY["trainer"] | {"logger": None},
                                           ["visual", "vl"], phase1, TINY["phase2"], phase3, True, 0)}
    vl, visual = runs["phase1_vl"]["model"]["init_args"], runs["phase1_visual"]["model"]["init_args"]
    assert vl["expert"] == TINY["phase1"]["vl"]["expert"] | {"head_dropout": 0.0}
    assert vl["optim"] == {"base_lr": 0.1, "warmup_epochs": 0} and visual["optim"] == {"base_lr": 0.5, "warmup_epochs": 0}
    assert runs["phase3_moe"]["data"]["source"] == lists
    assert runs["phase2_vl"]["data"]["source"] == TINY["data"]["source"]
    loggers = runs["phase2_vl"]["trainer"]["logger"]
    assert [(c["class_path"], c["init_args"]["save_dir"]) for c in loggers] == [
        ("lightning.pytorch.loggers.CSVLogger", str(tmp_path / "phase2_vl"))]
    with pytest.raises(ConfigError, match=r"pipeline phase2.vl: unknown keys \['expret'\]"):
        plan(str(tmp_path), TINY["data"], TINY["trainer"], ["visual", "vl"], TINY["phase1"], {"vl": {"expret": {}}},
             TINY["phase3"], True, 0)


def test_pipeline_rejects_bad_configuration_before_training(tmp_path):
    with pytest.raises(ConfigError, match="mixture=true .* needs both experts"):
        run_pipeline(run_dir=str(tmp_path), data=TINY["data"], experts=["visual"])
    with pytest.raises(ConfigError, match=r"phase1: unknown keys \['modle'\]"):
        run_pipeline(run_dir=str(tmp_path), data=TINY["data"], phase1={"modle": {}})
    bad = copy.deepcopy(TINY)
    bad["phase2"]["model"]["group_prompts"]["topk"] = 2
    with pytest.raises(ConfigError, match=r"phase2_visual/config.yaml: model.init_args.group_prompts.topk is not an "
                                          r"option of lpt_lightning.models.expert.GroupPromptSpec; did you mean top_k\?"):
        run_pipeline(run_dir=str(tmp_path / "bad"), **bad)
    assert not (tmp_path / "bad" / "phase1_visual" / "final.ckpt").exists()


@pytest.mark.parametrize("mixture, tested", [(True, ["phase3_moe"]), (False, ["phase2_visual"])])
def test_test_final_evaluates_only_the_phases_that_are_the_result(tmp_path, monkeypatch, mixture, tested):
    from lpt_lightning import pipeline

    calls = []
    monkeypatch.setattr(pipeline, "run_phase", lambda run, test, log_model, test_start: calls.append((run.name, test)))
    config = copy.deepcopy(TINY) | {"experts": ["visual", "vl"] if mixture else ["visual"], "mixture": mixture}
    run_pipeline(run_dir=str(tmp_path), test="final", **config)
    assert [name for name, test in calls if test] == tested
    assert len(calls) == (5 if mixture else 2)


def test_reevaluating_a_finished_phase_rewrites_the_same_results(finished_run):
    """`reevaluate_phase` (accuracy_study --reevaluate) runs only the pipeline's own evaluation of
    final.ckpt (and phase 1's start.ckpt): on unchanged code it writes back exactly the results
    the phase wrote when it finished, and trains nothing."""
    from lpt_lightning.pipeline import PhaseRun, reevaluate_phase

    run_dir, _ = finished_run
    for name in ("phase1_visual", "phase3_moe"):
        directory = run_dir / name
        before = json.loads((directory / "metrics.json").read_text())
        final = digest(directory / "final.ckpt")
        (directory / "metrics.json").unlink()
        reevaluate_phase(PhaseRun(name, name.split("_")[0], directory, {}))
        assert json.loads((directory / "metrics.json").read_text()) == before
        assert digest(directory / "final.ckpt") == final


def test_test_time_rows_sit_beside_the_plain_ones(finished_run):
    """`test_time_rows`: phase 3's weights tested again with each expert averaging its
    probabilities over the flipped views; the rows join the summary as ``test (flip): ...``, the
    phase's own reports stay byte-identical, and a second call reuses the file."""
    from lpt_lightning.pipeline import PhaseRun, test_with_augmentation
    from lpt_lightning.pipeline_summary import summary_rows

    run_dir, _ = finished_run
    phase3 = PhaseRun("phase3_moe", "phase3", run_dir / "phase3_moe", {})
    reports = {p: digest(p) for p in phase3.directory.rglob("*") if p.is_file() and "expert_cache" not in p.parts}
    test_with_augmentation(phase3, "flip")
    written = phase3.directory / "test_time_flip.json"
    stamp = written.stat().st_mtime_ns
    test_with_augmentation(phase3, "flip")
    assert written.stat().st_mtime_ns == stamp
    assert {p: digest(p) for p in reports} == reports
    plain = json.loads((phase3.directory / "metrics.json").read_text())["results"]
    flipped = json.loads(written.read_text())["results"]
    assert set(flipped) == {k for k in plain if k.startswith("test: ")}
    runs = [PhaseRun(d.name, d.name.split("_")[0], d, {}) for d in sorted(run_dir.glob("phase*")) if d.is_dir()]
    rows = summary_rows(runs)
    for name, row in flipped.items():
        title = name.split(": ", 1)[1]
        title += ", phase 2" if "expert" in title else ""
        assert rows[f"test (flip): {title}"] == row
        assert rows[f"test: {title}"]["per_class"] == plain[name]["per_class"]
        assert len(row["per_class"]) == 10 and 0 <= row["acc"] <= 100
    # The experts saw the mirrored views too: their averaged probabilities differ from the plain ones.
    assert all(row["nll"] != plain[name]["nll"] for name, row in flipped.items())
