"""Bad input through the real ``lpt`` command, as a user with messy data meets it.

The module builds a corpus of its own (list and json files, images, checkpoints, configs, run
directories) and runs every case through ``lpt_lightning.cli.main`` in a subprocess (one process
for the whole batch, see lpt_cases_driver.py; two cases also through the installed console
script). Each case must end with exit code 2, a message naming the file
or option at fault, no traceback, and every file that existed before byte-identical after.
docs/reliability.md lists the cases with what the user sees.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tiny_models import TIMM_TINY

REPO = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("lpt_cases_driver.py")
CLASSES = 3


def child_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled",
                LPT_DEBUG="")


def phase1_config(root: Path, run: Path, **data_source) -> dict:
    """A tiny phase-1 run on the corpus images: builds in about a second."""
    source = {"root": str(root), "train_list": "train.txt", "val_list": "val.txt"} | data_source
    return {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "default_root_dir": str(run),
                    "enable_progress_bar": False, "enable_model_summary": False, "logger": False,
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(run / "checkpoints"), "save_last": "link"}}]},
        "model": {"class_path": "lpt_lightning.phases.AdaptPhase",
                  "init_args": {"expert": {"kind": "visual", "prompt_length": 2,
                                           "backbone": {"name": "vit_base_patch16_224", "pretrained": False,
                                                        "model_kwargs": TIMM_TINY}},
                                # One epoch: a warm-up as long as the run is refused.
                                "optim": {"warmup_epochs": 0}}},
        "data": {"source": {"class_path": "lpt_lightning.data.AnnotationListSource", "init_args": source},
                 "batch_size": 2, "num_workers": 0},
    }


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


class Payload:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('payload ran')",))


def build_corpus(c: Path) -> dict[str, dict]:
    """The corpus under ``c`` and the cases: name -> {args, expect (substrings of stderr)}."""
    from lpt_lightning.checkpoints import export_safetensors
    from lpt_lightning.models.expert import ExpertSpec
    from lpt_lightning.phases import AdaptPhase
    from tiny_models import tiny_backbone

    data = c / "data"
    rng = np.random.default_rng(0)
    lines = []
    for label in range(CLASSES):
        for i in range(3):
            name = f"c{label}/img {i}.png"  # spaces in paths are supported
            write(data / name, b"")
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(data / name)
            lines.append(f"{name} {label}")
    write(data / "train.txt", "\n".join(lines) + "\n")
    write(data / "val.txt", "\n".join(lines[::3]) + "\n")
    jpeg = data / "good.jpg"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg, quality=90)
    write(data / "truncated.jpg", jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    write(data / "garbage.jpg", b"this is not an image")
    write(data / "empty.png", b"")

    def config(name: str, run: str = "runs/fresh", **source) -> str:
        path = c / "configs" / f"{name}.yaml"
        write(path, yaml.safe_dump(phase1_config(data, c / run, **source)))
        return str(path)

    def train_list(name: str, text: str | bytes) -> str:
        write(data / name, text)
        return config(name.replace(".", "_"), train_list=name)

    good = config("good")
    # Checkpoints: a real phase-1 one, then damaged, foreign and unsafe variants.
    ck = c / "ckpt"
    ck.mkdir()
    phase = AdaptPhase(expert=ExpertSpec(kind="visual", backbone=tiny_backbone("visual"), prompt_length=2),
                       num_classes=CLASSES)
    real = {"state_dict": phase.state_dict(), "lpt": phase.metadata()}
    torch.save(real, ck / "phase1.ckpt")
    blob = (ck / "phase1.ckpt").read_bytes()
    write(ck / "empty.ckpt", b"")
    write(ck / "truncated.ckpt", blob[: len(blob) // 2])
    write(ck / "random.ckpt", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    torch.save(dict(real, payload=Payload(c / "PAYLOAD_RAN")), ck / "payload.ckpt")
    torch.save({"state_dict": {"w": torch.zeros(2)}}, ck / "foreign.ckpt")
    torch.save({"state_dict": real["state_dict"], "lpt": dict(real["lpt"], phase="group_prompt")}, ck / "phase2.ckpt")
    five = AdaptPhase(expert=ExpertSpec(kind="visual", backbone=tiny_backbone("visual"), prompt_length=2),
                      num_classes=5)
    torch.save({"state_dict": five.state_dict(), "lpt": five.metadata()}, ck / "five_classes.ckpt")
    export_safetensors(ck / "phase1.ckpt", ck / "phase1.safetensors")

    # Run directories: one holding an earlier run's checkpoints, one with an earlier config.yaml.
    write(c / "runs/earlier/checkpoints/last.ckpt", blob)
    write(c / "runs/earlier/checkpoints/epoch=0-step=4.ckpt", blob)
    earlier = config("earlier", run="runs/earlier")
    write(c / "runs/configured/config.yaml", "# the config of an earlier run\n")
    configured = config("configured", run="runs/configured")
    # An earlier run that --overwrite would replace, had the new run's images been readable.
    write(c / "runs/replaced/checkpoints/last.ckpt", blob)
    write(c / "runs/replaced/checkpoints/epoch=0-step=4.ckpt", blob)
    write(c / "runs/replaced/config.yaml", "# the config of an earlier run\n")
    replaced = config("replaced", run="runs/replaced", train_list="garbage.txt")

    # iNaturalist-style json
    def inat(name: str, text: str | bytes) -> str:
        write(data / name, text)
        path = c / "configs" / f"{name.replace('.', '_')}.yaml"
        cfg = phase1_config(data, c / "runs/fresh")
        cfg["data"]["source"] = {"class_path": "lpt_lightning.data.INatJsonSource",
                                 "init_args": {"root": str(data), "train_json": name, "test_json": None}}
        cfg["data"] |= {"holdout_per_class": 1, "holdout_max_fraction": 0.5}
        write(path, yaml.safe_dump(cfg))
        return str(path)

    cats = [{"id": i, "name": f"species {i}"} for i in range(CLASSES)]
    images = [{"id": i, "file_name": ln.rsplit(" ", 1)[0]} for i, ln in enumerate(lines)]
    anns = [{"image_id": i, "category_id": int(ln.rsplit(" ", 1)[1])} for i, ln in enumerate(lines)]
    pipeline = write(c / "configs/pipeline.yaml", yaml.safe_dump({
        "run_dir": str(c / "runs/pipeline"), "experts": ["visual"], "mixture": False,
        "trainer": phase1_config(data, c)["trainer"] | {"callbacks": None, "default_root_dir": None},
        "data": phase1_config(data, c)["data"],
        "phase1": {"model": phase1_config(data, c)["model"]["init_args"]},
        "phase2": {"model": {"group_prompts": {"pool_size": 2, "top_k": 1, "start_block": 2, "length": 2}}},
    }))

    typo_config = phase1_config(data, c / "runs/fresh")
    typo_config["data"]["batch_sise"] = 2
    typo = str(write(c / "configs/typo.yaml", yaml.safe_dump(typo_config)))
    nested_typo_config = phase1_config(data, c / "runs/fresh")
    nested_typo_config["model"]["init_args"]["optim"] = {"base_lrr": 0.1}
    nested_typo = str(write(c / "configs/nested_typo.yaml", yaml.safe_dump(nested_typo_config)))
    fit = ["fit", "--config"]
    return {
        # ---------------------------------------------------------------- annotation lists
        "label beyond the classes (no names file)": dict(
            args=fit + [train_list("gap.txt", "\n".join(lines) + "\nc0/img 0.png 7\n")],
            expect=["gap.txt, line 10: label 7 is outside [0, 3)", "class_names_file"]),
        "negative label": dict(args=fit + [train_list("neg.txt", "c0/img 0.png -1\n" + "\n".join(lines))],
                               expect=["neg.txt, line 1: label -1 is outside"]),
        "label out of range in the val list": dict(
            args=fit + [config("badval", val_list="badval.txt")], expect=["badval.txt, line 2: label 9"],
            files={"badval.txt": "c0/img 0.png 0\nc1/img 0.png 9\n"}),
        "line without a label": dict(args=fit + [train_list("nolabel.txt", "c0/img 0.png 0\nc1/img_0.png\n")],
                                     expect=["nolabel.txt, line 2", "a path, then the label"]),
        "label not an integer": dict(args=fit + [train_list("word.txt", "c0/img 0.png zero\n")],
                                     expect=["word.txt, line 1: label 'zero' is not an integer"]),
        "list file not UTF-8": dict(args=fit + [train_list("latin1.txt", "caf\xe9.png 0\n".encode("latin-1"))],
                                    expect=["latin1.txt, line 1: not UTF-8"]),
        "list file missing": dict(args=fit + [config("nolist", train_list="absent.txt")],
                                  expect=["absent.txt does not exist", "data.source.init_args.train_list"]),
        "data root missing": dict(args=fit + [good, "--data.source.init_args.root=/nonexistent/lpt-data"],
                                  expect=["/nonexistent/lpt-data does not exist", "data.source.init_args.root"]),
        # ---------------------------------------------------------------- images
        "listed image missing": dict(
            args=fit + [train_list("missing.txt", "\n".join(lines) + "\nc2/gone.png 2\n")],
            expect=["c2/gone.png (", "missing.txt, line 10): does not exist", "data.skip_unreadable"]),
        "image is not an image": dict(
            args=fit + [train_list("garbage.txt", "\n".join(lines) + "\ngarbage.jpg 1\nempty.png 2\n")],
            expect=["2 of 11 checked images", "garbage.jpg (", "garbage.txt, line 10)", "empty.png (",
                    "line 11)", "data.skip_unreadable"]),
        "truncated JPEG, default check": dict(
            args=fit + [train_list("trunc_default.txt", "\n".join(lines) + "\ntruncated.jpg 0\n")],
            expect=["truncated.jpg (", "trunc_default.txt, line 10): OSError: image file is truncated"]),
        "truncated JPEG, full check": dict(
            args=fit + [train_list("trunc.txt", "\n".join(lines) + "\ntruncated.jpg 0\n"),
                        "--data.verify_images=full"],
            expect=["truncated.jpg (", "trunc.txt, line 10)", "OSError"]),
        # ---------------------------------------------------------------- json
        "json not valid": dict(args=fit + [inat("broken.json", '{"images": [')], expect=["broken.json: invalid JSON"]),
        "json unknown category": dict(
            args=fit + [inat("unknown_cat.json", json.dumps({"images": images, "categories": cats,
                                                             "annotations": anns + [{"image_id": 0, "category_id": 99}]}))],
            expect=["unknown_cat.json: annotations[9] has category_id 99"]),
        "json image missing on disk": dict(
            args=fit + [inat("gone.json", json.dumps({
                "images": images + [{"id": 99, "file_name": "c1/gone.png"}], "categories": cats,
                "annotations": anns + [{"image_id": 99, "category_id": 1}]}))],
            expect=["c1/gone.png (", "gone.json, images[9]): does not exist"]),
        # ---------------------------------------------------------------- checkpoints
        "ckpt_path missing": dict(args=fit + [good, f"--ckpt_path={ck / 'absent.ckpt'}"],
                                  expect=["absent.ckpt: checkpoint not found"]),
        "ckpt_path empty file": dict(args=fit + [good, f"--ckpt_path={ck / 'empty.ckpt'}"],
                                     expect=["empty.ckpt: cannot be loaded safely"]),
        "ckpt_path truncated": dict(args=["test", "--config", good, f"--ckpt_path={ck / 'truncated.ckpt'}"],
                                    expect=["truncated.ckpt: cannot be loaded safely"]),
        "ckpt_path random bytes": dict(args=["validate", "--config", good, f"--ckpt_path={ck / 'random.ckpt'}"],
                                       expect=["random.ckpt: cannot be loaded safely"]),
        "ckpt_path with a pickle payload": dict(args=fit + [good, f"--ckpt_path={ck / 'payload.ckpt'}"],
                                                expect=["payload.ckpt: cannot be loaded safely", "pickled objects"]),
        "ckpt_path not an lpt checkpoint": dict(args=["test", "--config", good, f"--ckpt_path={ck / 'foreign.ckpt'}"],
                                                expect=["foreign.ckpt: not an lpt_lightning phase checkpoint"]),
        "ckpt_path of another phase": dict(args=fit + [good, f"--ckpt_path={ck / 'phase2.ckpt'}"],
                                           expect=["ckpt_path=", "phase2.ckpt: written by phase 'group_prompt'",
                                                   "phase 'adapt'"]),
        "ckpt_path for another class count": dict(
            args=["predict", "--config", good, f"--ckpt_path={ck / 'five_classes.ckpt'}"],
            expect=["five_classes.ckpt: trained for 5 classes, but the data has 3"]),
        "ckpt_path is a safetensors export": dict(args=fit + [good, f"--ckpt_path={ck / 'phase1.safetensors'}"],
                                                  expect=["phase1.safetensors: an export holds no trainer state"]),
        "phase1_checkpoint with a pickle payload": dict(
            args=fit + [good, "--model=lpt_lightning.phases.GroupPromptPhase",
                        f"--model.init_args.phase1_checkpoint={ck / 'payload.ckpt'}"],
            expect=["payload.ckpt: cannot be loaded safely"]),
        "phase1_checkpoint missing": dict(
            args=fit + [good, "--model=lpt_lightning.phases.GroupPromptPhase",
                        f"--model.init_args.phase1_checkpoint={ck / 'absent.ckpt'}"],
            expect=["absent.ckpt: checkpoint not found"]),
        "export of a truncated checkpoint": dict(args=["export", str(ck / "truncated.ckpt"), str(c / "out.safetensors")],
                                                 expect=["truncated.ckpt: cannot be loaded safely"]),
        # ---------------------------------------------------------------- options and configs
        "abbreviated option": dict(args=fit + [good, "--trainer.max_epoch=1"],
                                   expect=["unrecognized arguments: --trainer.max_epoch=1"]),
        "unknown key in a config file": dict(args=fit + [typo], expect=["batch_sise"]),
        "misspelt key inside a nested init_args": dict(
            args=fit + [nested_typo], expect=[f"error: {nested_typo}: model.init_args.optim.base_lrr is not an option "
                                              "of lpt_lightning.phases.OptimSpec; did you mean base_lr?\n"]),
        "misspelt nested option": dict(
            args=fit + [good, "--model.init_args.expert.prompt_lenght=3"],
            expect=["error: --model.init_args.expert.prompt_lenght is not an option of "
                    "lpt_lightning.models.expert.ExpertSpec; did you mean prompt_length?\n"]),
        "impossible value": dict(args=fit + [good, "--data.batch_size=0"], expect=["data.batch_size must be >= 1"]),
        "dataset without a validation split": dict(
            args=fit + [config("noval", val_list=None)], expect=["no validation split", "data.holdout_per_class"]),
        "pipeline: abbreviated option": dict(args=["pipeline", "--config", str(pipeline), "--run_di=elsewhere"],
                                             expect=["--run_di"]),
        "pipeline: nested override keeps class_path": dict(
            args=["pipeline", "--config", str(pipeline), "--data.source.init_args.root=/nonexistent/lpt-data"],
            expect=["/nonexistent/lpt-data does not exist", "data.source.init_args.root"]),
        # ---------------------------------------------------------------- run directories
        "fit into a directory with an earlier run": dict(
            args=fit + [earlier], expect=["runs/earlier/checkpoints already holds checkpoints of an earlier run",
                                          "--ckpt_path=last", "new directory", "--overwrite=true"]),
        "resume with nothing to resume": dict(args=fit + [good, "--ckpt_path=last"],
                                              expect=["ckpt_path=last: no checkpoint to resume in", "runs/fresh"]),
        "--overwrite, then a bad image: the earlier run is kept": dict(
            args=fit + [replaced, "--overwrite=true"], expect=["garbage.jpg (", "garbage.txt, line 10)"]),
        "fresh fit would replace a run's config.yaml": dict(
            args=fit + [configured], expect=["runs/configured/config.yaml holds the config of an earlier run",
                                             "--overwrite=true"]),
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    cases = build_corpus(root)
    for case in cases.values():
        for name, text in case.pop("files", {}).items():
            write(root / "data" / name, text)
    return root, cases


ENTRY_POINT_CASES = {"script": "ckpt_path with a pickle payload", "debug": "ckpt_path empty file"}


@pytest.fixture(scope="module")
def results(corpus):
    """The driver's results per case, plus (started first, they run meanwhile) two cases through
    the installed console script: one plain, one with ``--debug``."""
    root, cases = corpus
    script = Path(sys.executable).parent / "lpt"
    lpt = [str(script)] if script.is_file() else [sys.executable, "-m", "lpt_lightning.cli"]
    procs = {key: subprocess.Popen([*lpt, *(["--debug"] if key == "debug" else []), *cases[case]["args"]],
                                   cwd=root, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for key, case in ENTRY_POINT_CASES.items()}
    batch = {name: {"args": case["args"], "cwd": str(root), "watch": str(root)} for name, case in cases.items()}
    (root.parent / "cases.json").write_text(json.dumps(batch))
    subprocess.run([sys.executable, str(DRIVER), str(root.parent / "cases.json"), str(root.parent / "results.json")],
                   env=child_env(), cwd=root, timeout=600, check=True)
    results = json.loads((root.parent / "results.json").read_text())
    for key, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        results[key] = {"code": proc.returncode, "stdout": stdout, "stderr": stderr, "changed": []}
    return results


def test_every_bad_input_ends_in_one_clean_message(corpus, results):
    """Exit code 2, the file or option named, no traceback, no file that existed changed."""
    root, cases = corpus
    failures = []
    for name, case in cases.items():
        try:
            check(name, results[name], case["expect"], root)
        except AssertionError as exc:
            failures.append(str(exc))
    assert not failures, f"{len(failures)} of {len(cases)} cases:\n\n" + "\n\n".join(failures)


def check(name: str, result: dict, expect: list[str], root: Path) -> None:
    seen = result["stdout"] + result["stderr"]
    assert result["code"] == 2, f"{name}: exit code {result['code']}\n{seen[-3000:]}"
    assert "Traceback" not in seen, f"{name}: a traceback was printed\n{seen[-3000:]}"
    assert "weights_only" not in seen, f"{name}: the message invites unpickling the file unsafely"
    for text in expect:
        assert text in result["stderr"], f"{name}: {text!r} not in the message\n{result['stderr'][-3000:]}"
    assert not result["changed"], f"{name}: changed files that existed before: {result['changed']}"
    assert not (root / "PAYLOAD_RAN").exists(), "a pickle payload ran"


def test_overwrite_puts_the_earlier_checkpoints_back_when_the_new_run_fails_its_checks(corpus, results):
    """The data check fails after the earlier run's checkpoints were set aside: they are back in
    place (byte-identical: `check`), and no set-aside folder is left."""
    root, cases = corpus
    case = "--overwrite, then a bad image: the earlier run is kept"
    check(case, results[case], cases[case]["expect"], root)
    kept = sorted(p.name for p in (root / "runs/replaced/checkpoints").iterdir())
    assert kept == ["epoch=0-step=4.ckpt", "last.ckpt"]
    assert not list((root / "runs/replaced").glob(".*lpt-overwritten"))
    assert "the earlier run's 2 checkpoints are back in" in results[case]["stdout"] + results[case]["stderr"]


def test_misspelt_nested_keys_are_reported_in_one_line(corpus, results):
    """Not jsonargparse's tree of union errors: the error is the message's last line, and alone."""
    for case in ("misspelt key inside a nested init_args", "misspelt nested option"):
        lines = results[case]["stderr"].strip().splitlines()
        assert lines[-1].startswith("error: ") and "did you mean" in lines[-1], lines
        assert sum(line.startswith("error") for line in lines) == 1 and "Union" not in results[case]["stderr"]


def test_console_script_fails_cleanly_and_debug_shows_the_traceback(corpus, results):
    root, cases = corpus
    case = ENTRY_POINT_CASES["script"]
    check(case, results["script"], cases[case]["expect"], root)
    debug = results["debug"]
    assert debug["code"] == 1
    assert "Traceback (most recent call last)" in debug["stderr"] and "CheckpointError" in debug["stderr"]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"exited early: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


@pytest.mark.slow
def test_ctrl_c_and_sigterm_end_in_one_line_saying_how_to_resume(corpus):
    """SIGTERM stops ``lpt fit`` and Ctrl-C (SIGINT) ``lpt pipeline`` mid-training: one line naming
    the phase and how to resume, no traceback; the resumed fit then finishes."""
    import signal

    root, _ = corpus
    run = root / "runs/interrupted"
    config = write(root / "configs/long.yaml", yaml.safe_dump(phase1_config(root / "data", run)))
    pipeline = yaml.safe_load((root / "configs/pipeline.yaml").read_text())
    pipeline["run_dir"] = str(root / "runs/pipeline_interrupted")
    write(root / "configs/long_pipeline.yaml", yaml.safe_dump(pipeline))
    lpt = [sys.executable, "-m", "lpt_lightning.cli"]
    fit = subprocess.Popen([*lpt, "fit", "--config", str(config), "--trainer.max_epochs=100000"], cwd=root,
                           env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pipe = subprocess.Popen([*lpt, "pipeline", "--config", str(root / "configs/long_pipeline.yaml"),
                             "--phase1.trainer.max_epochs=100000"], cwd=root, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(run / "checkpoints" / "last.ckpt", fit)
    fit.send_signal(signal.SIGTERM)
    wait_for(root / "runs/pipeline_interrupted/phase1_visual/checkpoints/last.ckpt", pipe)
    pipe.send_signal(signal.SIGINT)
    fit_err, pipe_err = fit.communicate(timeout=120)[1], pipe.communicate(timeout=120)[1]
    assert fit.returncode == 128 + signal.SIGTERM, fit_err[-3000:]
    assert pipe.returncode == 128 + signal.SIGINT, pipe_err[-3000:]
    assert "Traceback" not in fit_err + pipe_err, (fit_err + pipe_err)[-3000:]
    assert fit_err.strip().splitlines()[-1].startswith("lpt fit: interrupted in phase adapt (")
    assert fit_err.strip().endswith("rerun with --ckpt_path=last to resume")
    assert pipe_err.strip().splitlines()[-1] == (
        "lpt pipeline: interrupted in phase phase1_visual; rerun the same command to resume")
    epochs = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"]
    resumed = subprocess.run([*lpt, "fit", "--config", str(config), f"--trainer.max_epochs={epochs + 2}",
                              "--ckpt_path=last"], cwd=root, env=child_env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == epochs + 1


def test_overwrite_starts_afresh_and_last_ckpt_is_the_new_runs(corpus, monkeypatch, capsys):
    """--overwrite=true deletes an earlier run's checkpoints, so last.ckpt is the new run's."""
    from lpt_lightning.cli import main

    root, _ = corpus
    run = root / "runs/overwritten"
    stale = write(run / "checkpoints/last.ckpt", b"an earlier run")
    write(run / "checkpoints/epoch=7-step=99.ckpt", b"an earlier run")
    config = write(root / "configs/overwritten.yaml", yaml.safe_dump(phase1_config(root / "data", run)))
    monkeypatch.chdir(root)
    torch.set_num_threads(1)
    main(["fit", "--config", str(config), "--overwrite=true"])
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert len(names) == 2 and names[0].startswith("epoch=0-") and names[1] == "last.ckpt", names
    assert torch.load(stale, weights_only=True)["epoch"] == 0
    assert not list(run.glob(".*lpt-overwritten")), "the earlier run's set-aside checkpoints were not deleted"


def test_checkpoints_left_set_aside_by_a_killed_overwrite_run_are_put_back(corpus, monkeypatch, capsys):
    """An --overwrite run killed before its first checkpoint leaves the earlier run's set aside: the
    next fit puts them back, so they are resumable (and a fresh run into the directory is refused)."""
    from lpt_lightning.cli import main

    root, _ = corpus
    run = root / "runs/killed"
    write(run / ".checkpoints.lpt-overwritten/last.ckpt", b"an earlier run")
    config = write(root / "configs/killed.yaml", yaml.safe_dump(phase1_config(root / "data", run)))
    monkeypatch.chdir(root)
    with pytest.raises(SystemExit) as exit:
        main(["fit", "--config", str(config)])
    assert exit.value.code == 2
    assert "checkpoints already holds checkpoints of an earlier run (last.ckpt)" in capsys.readouterr().err
    assert (run / "checkpoints/last.ckpt").read_bytes() == b"an earlier run"
    assert not (run / ".checkpoints.lpt-overwritten").exists()
