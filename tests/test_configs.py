"""Every shipped config parses and validates with the real ``lpt`` parser (nothing is built),
the entry points carry the values of the pieces they are made of, every combination the README
shows validates, and the benchmark configs carry the reference constants of SPEC.md."""
from __future__ import annotations

import copy
import functools
import io
import itertools
import re
import shlex
import shutil
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

from lpt_lightning.cli import main
from lpt_lightning.models.backbones import BackboneSpec
from lpt_lightning.models.expert import ExpertSpec, GroupPromptSpec

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
# Pieces: each fills one section, given on the command line with this option (README "Config layout").
PIECE_OPTIONS = {"data": "--data", "expert": "--model.init_args.expert", "phase": "--model", "trainer": "--trainer",
                 "logger": "--trainer.logger"}
PIECES = sorted(p for kind in PIECE_OPTIONS for p in (CONFIG_DIR / kind).glob("*.yaml"))
ENTRY_POINTS = sorted(p for p in CONFIG_DIR.rglob("*.yaml") if p.relative_to(CONFIG_DIR).parts[0] not in PIECE_OPTIONS)
# Pipeline files (*_pipeline.yaml) compose phase configs: they are checked further down.
ALL_CONFIGS = [p for p in ENTRY_POINTS if not p.name.endswith("_pipeline.yaml")]
DATASETS = ("places_lt", "imagenet_lt", "inat18", "cifar100_lt")
# data/<dataset>_prepared.yaml: the dataset's piece on the copy `lpt prepare` writes (checked below).
PREPARED = {dataset: CONFIG_DIR / "data" / f"{dataset}_prepared.yaml" for dataset in DATASETS}
REFERENCE_BACKBONE = {"visual": "vit_base_patch16_224.augreg_in21k", "vl": "ViT-B-16"}


def config_id(path: Path) -> str:
    return str(path.relative_to(CONFIG_DIR))


def run_print_config(path: Path | str, *overrides: str) -> tuple[int, str, str]:
    """``lpt fit --config PATH ... --print_config``: the real parser validates, nothing is built."""
    return run_fit_print_config("--config", str(path), *overrides)


def run_fit_print_config(*args: str) -> tuple[int, str, str]:
    """``lpt fit ARGS --print_config``."""
    out, err = io.StringIO(), io.StringIO()
    # sys.argv is pytest's: LightningCLI warns when it sees both args and a command line.
    with mock.patch.object(sys, "argv", ["lpt"]), redirect_stdout(out), redirect_stderr(err):
        try:
            main(["fit", *args, "--print_config"])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        else:
            code = 0
    return code, out.getvalue(), err.getvalue()


@functools.lru_cache(maxsize=None)
def parse_config(path: Path) -> dict:
    code, out, err = run_print_config(path)
    assert code == 0, f"{path} does not validate:\n{err[-3000:]}"
    return yaml.safe_load(out)


def parse_error(path: Path, *overrides: str) -> str:
    code, out, err = run_print_config(path, *overrides)
    assert code != 0, f"{path} {overrides} validated but should not"
    return out + err


def beside_the_pieces(tmp_path: Path, text: str) -> Path:
    """``text`` as a config in a copy of configs/, so that its piece paths resolve."""
    shutil.copytree(CONFIG_DIR, tmp_path / "configs")
    path = tmp_path / "configs" / "bad.yaml"
    path.write_text(text)
    return path


def test_there_are_configs():
    names = {config_id(p) for p in ALL_CONFIGS}
    for dataset in DATASETS:
        for suffix in ("phase1", "phase2", "phase1_vl", "phase2_vl", "linear_probe"):
            assert f"{dataset}_{suffix}.yaml" in names
    assert any(n.startswith("cpu/") for n in names)
    assert {p.parent.name for p in PIECES} == set(PIECE_OPTIONS)


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=config_id)
def test_config_validates(path):
    raw = yaml.safe_load(path.read_text())
    assert {"trainer", "model", "data"} <= set(raw), f"{path}: not a LightningCLI config"
    cfg = parse_config(path)
    model = cfg["model"]
    assert model["class_path"] in ("lpt_lightning.phases.AdaptPhase", "lpt_lightning.phases.GroupPromptPhase",
                                   "lpt_lightning.phases.MoEScorerPhase")
    assert cfg["data"]["source"]["class_path"].startswith("lpt_lightning.data.")
    # Every run writes under its own runs/<dataset>/<phase>_<expert> directory.
    root = cfg["trainer"]["default_root_dir"]
    assert root.startswith("runs/")
    ckpt = [c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    assert len(ckpt) == 1 and ckpt[0]["init_args"]["save_last"] in (True, "link")
    assert ckpt[0]["init_args"]["dirpath"] == f"{root}/checkpoints"


@pytest.mark.parametrize(
    "override, key",
    [
        ("--model.init_args.expert.promt_length=3", "promt_length"),  # unknown key
        ("--model.init_args.expert.prompt_length=abc", "prompt_length"),  # wrong type
        ("--model.init_args.optim.base_lr=fast", "base_lr"),
        ("--model.init_args.split_convention=lift", "split_convention"),
        ("--data.sampling=balanced", "data.sampling"),
    ],
)
def test_bad_override_fails_naming_the_key(override, key):
    message = parse_error(CONFIG_DIR / "places_lt_phase1.yaml", override)
    assert key in message


def test_unknown_key_in_a_config_file_fails(tmp_path):
    text = (CONFIG_DIR / "places_lt_phase2.yaml").read_text()
    bad = beside_the_pieces(tmp_path, text.replace("top_k: 2", "topk: 2"))
    assert "topk" in parse_error(bad)


def test_unknown_key_in_a_piece_fails(tmp_path):
    bad = beside_the_pieces(tmp_path, (CONFIG_DIR / "places_lt_phase1.yaml").read_text())
    piece = bad.parent / "data" / "places_lt.yaml"
    piece.write_text(piece.read_text().replace("images_per_class:", "images_per_klass:"))
    assert "images_per_klass" in parse_error(bad)


def test_unknown_class_path_fails(tmp_path):
    text = (CONFIG_DIR / "places_lt_phase1.yaml").read_text()
    bad = beside_the_pieces(tmp_path, text.replace("lpt_lightning.phases.AdaptPhase", "lpt_lightning.phases.AdaptPhaze"))
    assert "AdaptPhaze" in parse_error(bad)


# ------------------------------------------------------------------ the hub: entry points and pieces
ENTRY_NAME = re.compile(r"(?P<dataset>\w+?)_(?P<phase>phase[123])(?P<vl>_vl)?")
SECTION = {
    "data": lambda cfg: cfg["data"],
    "expert": lambda cfg: cfg["model"]["init_args"]["expert"],
    "phase": lambda cfg: cfg["model"],
    "trainer": lambda cfg: cfg["trainer"],
}


def pieces_of(path: Path) -> dict[str, Path]:
    """The pieces an entry point is made of: named in it (data, the phase-1 expert) or spelled out
    beside its run's paths (trainer, phase; the CPU and stand-in configs have their own phase values)."""
    if path.parent.name == "standins":
        kind = path.stem.removesuffix("_expert")
        names = {"trainer": "cpu", "data": "fmnist_lt_standins", "expert": f"standin_{kind}"}
    elif path.stem.endswith("_linear_probe"):
        names = {"trainer": "gpu", "data": path.stem.removesuffix("_linear_probe"), "expert": "visual_linear_probe"}
    else:
        match = ENTRY_NAME.fullmatch(path.stem)
        kind, phase = ("vl" if match["vl"] else "visual"), match["phase"]
        if path.parent.name == "cpu":
            names = {"trainer": "cpu", "data": match["dataset"]} | ({"expert": f"tiny_{kind}"} if phase == "phase1" else {})
        else:
            names = {"trainer": "gpu", "data": match["dataset"], "phase": phase} | (
                {"expert": kind} if phase == "phase1" else {})
    return {section: CONFIG_DIR / section / f"{name}.yaml" for section, name in names.items()}


def mismatches(actual, expected, where: str = "") -> list[str]:
    """Where ``actual`` (a parsed config section) differs from the values ``expected`` (a piece) sets."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{where}: {actual!r} where the piece has {expected!r}"]
        return [m for key, value in expected.items() for m in mismatches(actual.get(key, "<missing>"), value, f"{where}.{key}")]
    return [] if actual == expected else [f"{where}: {actual!r} where the piece has {expected!r}"]


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=config_id)
def test_entry_point_carries_the_values_of_its_pieces(path):
    cfg = parse_config(path)
    for section, piece in pieces_of(path).items():
        expected = yaml.safe_load(piece.read_text())
        if section == "data" and cfg["model"]["class_path"].endswith("MoEScorerPhase"):
            expected["sampling"] = "class_aware"  # the scorer trains class-balanced
        if section == "data" and path.stem.endswith("_linear_probe"):
            expected["sampling"] = "instance"  # one plain stream
        assert not mismatches(SECTION[section](cfg), expected, section), f"{config_id(path)} and {config_id(piece)}"


def test_piece_paths_are_relative_to_the_config_that_names_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: the pieces are found beside the entry point
    path = CONFIG_DIR / "cpu" / "fmnist_lt_phase1.yaml"
    code, out, err = run_print_config(path)
    assert code == 0, err[-3000:]
    assert yaml.safe_load(out) == parse_config(path)


def readme_commands(subcommand: str = "fit") -> list[list[str]]:
    """The ``lpt SUBCOMMAND`` commands of the README's "Config layout" section, without ``lpt SUBCOMMAND``."""
    section = (REPO / "README.md").read_text().split("\n## Config layout\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:2] == ["lpt", subcommand]:
                commands.append(words[2:])
    return commands


README_COMMANDS = readme_commands()
# Where the piece given with an option lands in the parsed config.
OPTION_SECTION = {
    "--data": SECTION["data"], "--model.init_args.expert": SECTION["expert"], "--model": SECTION["phase"],
    "--trainer": SECTION["trainer"], "--trainer.logger": lambda cfg: cfg["trainer"]["logger"],
    "--trainer.logger+": lambda cfg: cfg["trainer"]["logger"][-1],
}


@pytest.mark.parametrize("args", README_COMMANDS, ids=lambda args: "+".join(Path(a).stem for a in args if a.startswith("configs/")))
def test_readme_combination_validates(args, monkeypatch):
    monkeypatch.chdir(REPO)  # the README's commands run from the repository root
    code, out, err = run_fit_print_config(*args)
    assert code == 0, f"lpt fit {' '.join(args)} does not validate:\n{err[-3000:]}"
    cfg = yaml.safe_load(out)
    given = [(option, Path(value)) for option, value in itertools.pairwise(args) if option in OPTION_SECTION]
    assert given, "the command combines no pieces"
    for option, piece in given:
        overridden = {a.split("=", 1)[0].removeprefix(option + ".") for a in args if a.startswith(option + ".")}
        expected = {k: v for k, v in yaml.safe_load(piece.read_text()).items() if k not in overridden}
        assert not mismatches(OPTION_SECTION[option](cfg), expected, option), piece


def test_every_piece_is_checked():
    """Each piece is carried by an entry point, named by a pipeline entry point or shown in a README
    command (each checked in this file)."""
    carried = {piece for path in ALL_CONFIGS for piece in pieces_of(path).values()}
    named = {piece for path in PIPELINE_CONFIGS for piece in pieces_named(path).values()}
    shown = {REPO / arg for args in README_COMMANDS + README_PIPELINE_COMMANDS for arg in args if arg.startswith("configs/")}
    assert set(PIECES) - carried - named - shown - set(PREPARED.values()) == set()


# ------------------------------------------------------------------ reference constants (SPEC 2-4)
@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("expert", ["visual", "vl"])
def test_benchmark_configs_have_reference_constants(dataset, expert):
    suffix = "_vl" if expert == "vl" else ""
    p1 = parse_config(CONFIG_DIR / f"{dataset}_phase1{suffix}.yaml")
    p2 = parse_config(CONFIG_DIR / f"{dataset}_phase2{suffix}.yaml")
    for cfg in (p1, p2):
        args = cfg["model"]["init_args"]
        loss, optim = args["loss"], args["optim"]
        assert (loss["kind"], loss["scale"], loss["margin"], loss["beta"]) == ("agcl", 20.0, 0.1, 0.5)
        assert loss["class_balanced_gammas"] == [0.0, 4.0] and loss["instance_gammas"] == [0.5, 8.0]
        assert (optim["base_lr"], optim["momentum"], optim["weight_decay"], optim["warmup_epochs"]) == (0.02, 0.9, 0.01, 1)
        assert args["split_convention"] == "lpt"
        data = cfg["data"]
        assert (data["sampling"], data["images_per_class"]) == ("dual", 4)
        assert cfg["trainer"]["max_epochs"] == 90
        assert cfg["trainer"]["precision"] == "bf16-mixed"

    a1 = p1["model"]["init_args"]
    assert p1["model"]["class_path"] == "lpt_lightning.phases.AdaptPhase"
    spec = a1["expert"]
    assert spec["kind"] == expert
    assert spec["backbone"]["name"] == REFERENCE_BACKBONE[expert]
    assert spec["backbone"]["pretrained"] == (True if expert == "visual" else "openai")
    assert spec["prompt_length"] == 10 and spec["adapters"] is True

    a2 = p2["model"]["init_args"]
    assert p2["model"]["class_path"] == "lpt_lightning.phases.GroupPromptPhase"
    assert a2["group_prompts"] == {"pool_size": 20, "top_k": 2, "start_block": 6, "length": 10}
    assert a2["loss"]["match_weight"] == 0.5
    # Phase 2 reads what phase 1 writes, and both use the same data.
    ckpt_dir = next(c for c in p1["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint"))
    assert a2["phase1_checkpoint"] == ckpt_dir["init_args"]["dirpath"] + "/last.ckpt"
    assert p1["data"] == p2["data"]


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("kind", ["ce", "logit_adjusted"])
def test_linear_probe_configs_train_the_head_alone(dataset, kind):
    """A frozen backbone and the head alone (no prompt, no adapters), CE or logit-adjusted CE."""
    path = CONFIG_DIR / f"{dataset}_linear_probe.yaml"
    if kind == "ce":
        cfg = parse_config(path)
    else:
        code, out, err = run_print_config(path, f"--model.init_args.loss.kind={kind}")
        assert code == 0, err[-3000:]
        cfg = yaml.safe_load(out)
    args = cfg["model"]["init_args"]
    assert cfg["model"]["class_path"] == "lpt_lightning.phases.AdaptPhase"
    assert (args["expert"]["prompt_length"], args["expert"]["adapters"]) == (0, False)
    assert args["expert"]["backbone"]["name"] == REFERENCE_BACKBONE["visual"]
    assert (args["loss"]["kind"], args["loss"]["tau"]) == (kind, 1.0)
    assert cfg["data"]["sampling"] == "instance"
    assert cfg["trainer"]["default_root_dir"] == f"runs/{dataset}/linear_probe"
    phase1 = parse_config(CONFIG_DIR / f"{dataset}_phase1.yaml")["data"]
    assert {k: v for k, v in cfg["data"].items() if k != "sampling"} == \
        {k: v for k, v in phase1.items() if k != "sampling"}  # the same data as the LPT++ rows


def test_linear_probe_expert_trains_only_the_head():
    from lpt_lightning.phases import AdaptPhase, LossSpec

    expert = yaml.safe_load((CONFIG_DIR / "expert" / "visual_linear_probe.yaml").read_text())
    expert["backbone"] = {"name": "vit_base_patch16_224", "pretrained": False,
                          "model_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}}
    spec = ExpertSpec(**{**expert, "backbone": BackboneSpec(**expert["backbone"])})
    model = AdaptPhase(expert=spec, num_classes=5, loss=LossSpec(kind="ce"))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("expert.head.") for name in trainable)
    loss = model._make_loss("ib", torch.tensor([50, 20, 10, 5, 2]))
    logits, labels = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    torch.testing.assert_close(loss(logits, labels), torch.nn.functional.cross_entropy(20.0 * logits, labels))


# ------------------------------------------------------------------ iNat18 at full size (random weights)
def test_inat18_phase2_builds_reference_shapes(tmp_path):
    from lpt_lightning.phases import AdaptPhase, GroupPromptPhase

    num_classes = 8142
    p1 = parse_config(CONFIG_DIR / "inat18_phase1.yaml")["model"]["init_args"]
    p2 = parse_config(CONFIG_DIR / "inat18_phase2.yaml")["model"]["init_args"]
    expert = dict(p1["expert"])
    expert["backbone"] = BackboneSpec(**(expert["backbone"] | {"pretrained": False}))  # no download
    phase1 = AdaptPhase(expert=ExpertSpec(**expert), num_classes=num_classes)
    ckpt = tmp_path / "phase1.ckpt"
    # Like a real phase checkpoint: everything but the frozen backbone, plus the metadata.
    state = {k: v for k, v in phase1.state_dict().items() if not k.startswith("expert.backbone.")}
    torch.save({"state_dict": state, "lpt": phase1.metadata()}, ckpt)
    del phase1

    phase2 = GroupPromptPhase(phase1_checkpoint=str(ckpt), group_prompts=GroupPromptSpec(**p2["group_prompts"]),
                              num_classes=num_classes)
    e = phase2.expert
    bb = e.backbone
    assert (bb.num_blocks, bb.embed_dim, bb.feature_dim, bb.img_size) == (12, 768, 768, 224)
    assert tuple(bb.model.patch_embed.patch_size) == (16, 16)
    assert tuple(e.shared_prompt.prompts.shape) == (12, 10, 768)
    assert tuple(e.group_prompts.prompts.shape) == (20, 6, 10, 768)
    assert tuple(e.group_prompts.keys.shape) == (20, 768)
    assert tuple(e.head.weight.shape) == (num_classes, 768)
    assert e.group_prompts.top_k == 2 and e.group_start == 6
    assert len(e.adapters) == 12
    trainable = {n for n, p in phase2.named_parameters() if p.requires_grad}
    assert trainable == {"expert.group_prompts.prompts", "expert.group_prompts.keys", "expert.head.weight"}
    n_trainable = sum(p.numel() for p in phase2.trainable_parameters())
    assert n_trainable == 20 * 6 * 10 * 768 + 20 * 768 + num_classes * 768


# ------------------------------------------------------------------ pipeline entry points
PIPELINE_CONFIGS = sorted(p for p in CONFIG_DIR.rglob("*_pipeline.yaml"))


@functools.cache
def parse_pipeline(path: Path) -> dict:
    """``lpt pipeline --config PATH``: the keyword arguments of `run_pipeline`, its pieces read."""
    from lpt_lightning.pipeline_cli import parse

    return parse(["--config", str(path)])


def pipeline_runs(settings: dict, run_dir: Path):
    """The phase runs ``lpt pipeline`` composes from its settings (parsed, or a pipeline file's plain values)."""
    from lpt_lightning.pipeline_plan import plan

    return plan(str(run_dir), settings["data"], settings.get("trainer"), settings.get("experts") or ["visual", "vl"],
                settings.get("phase1"), settings.get("phase2"), settings.get("phase3"), settings.get("mixture", True),
                settings.get("seed_everything", 0))


def pieces_named(path: Path) -> dict[str, Path]:
    """The pieces a pipeline file names, by the dotted key they fill (``data``, ``phase1.vl.expert``)."""
    raw = yaml.safe_load(path.read_text())
    named = {key: raw.get(key) for key in ("data", "trainer")}
    for phase, expert in itertools.product(("phase1", "phase2"), ("visual", "vl")):
        named[f"{phase}.{expert}.expert"] = ((raw.get(phase) or {}).get(expert) or {}).get("expert")
    return {key: (path.parent / value).resolve() for key, value in named.items() if isinstance(value, str)}


def with_pieces_pasted_in(path: Path) -> dict:
    """A pipeline file's values with each piece it names pasted in: how the files were written
    before ``lpt pipeline`` read pieces."""
    raw = yaml.safe_load(path.read_text())
    for key, piece in pieces_named(path).items():
        *parents, leaf = key.split(".")
        functools.reduce(dict.__getitem__, parents, raw)[leaf] = yaml.safe_load(piece.read_text())
    return raw


def parsed_phase(run, path: Path) -> dict:
    """A composed phase config as ``lpt fit --config`` parses and validates it (``path``: where to write it)."""
    from lpt_lightning.lightning_cli import parse_config as lpt_parse_config

    path.write_text(yaml.safe_dump(run.config, sort_keys=False))
    cfg = lpt_parse_config(["fit", "--config", str(path)]).fit.clone(with_meta=False).as_dict()
    del cfg["config"]  # the path given
    return cfg


@pytest.mark.parametrize("path", PIPELINE_CONFIGS, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_pipeline_config_composes_the_phases_of_its_pieces(path, tmp_path):
    """Every pipeline entry point names its data and experts as pieces, and each phase it runs is
    valid and, as ``lpt fit`` parses it, the phase the same file composes with those pieces pasted in."""
    named = pieces_named(path)
    assert "data" in named and {"phase1.visual.expert"} <= set(named), f"{path} names no data or expert piece"
    settings = parse_pipeline(path)
    assert settings["run_dir"].startswith("runs/")
    runs = pipeline_runs(settings, tmp_path / "run")
    expected = ["phase1_visual", "phase2_visual"] + (["phase1_vl", "phase2_vl"] if "vl" in settings["experts"] else [])
    assert [r.name for r in runs if r.phase != "phase3"] == expected
    assert any(r.phase == "phase3" for r in runs) == settings["mixture"]
    pasted = pipeline_runs(with_pieces_pasted_in(path), tmp_path / "run")
    assert [r.name for r in pasted] == [r.name for r in runs]
    for run, same in zip(runs, pasted):
        assert parsed_phase(run, tmp_path / f"{run.name}.yaml") == parsed_phase(same, tmp_path / f"{run.name}.pasted.yaml"), run.name


ENTRY_POINT_OF_PHASE = {"phase1_visual": "phase1", "phase1_vl": "phase1_vl", "phase2_visual": "phase2",
                        "phase2_vl": "phase2_vl", "phase3_moe": "phase3"}


def without_run_paths(cfg: dict) -> dict:
    """A parsed config without what names its run's directories (and so differs between a
    pipeline phase and the single-phase config): run directory, logger, callbacks, checkpoints read,
    the record of the image check."""
    cfg = copy.deepcopy(cfg)
    for key in ("default_root_dir", "logger", "callbacks"):
        del cfg["trainer"][key]
    del cfg["data"]["verify_record_dir"]
    for key in ("phase1_checkpoint", "visual_checkpoint", "vl_checkpoint"):
        cfg["model"]["init_args"].pop(key, None)
    return cfg


def phase_configs_of(runs, tmp_path: Path) -> dict[str, dict]:
    """Each run's config as ``lpt fit --config`` prints it, by run name."""
    configs = {}
    for run in runs:
        path = tmp_path / f"{run.name}.yaml"
        path.write_text(yaml.safe_dump(run.config, sort_keys=False))
        configs[run.name] = parse_config(path)
    return configs


@pytest.mark.parametrize("dataset", DATASETS)
def test_pipeline_phases_equal_the_single_phase_configs(dataset, tmp_path):
    """Each phase a pipeline runs equals the single-phase entry point of the same pieces, but for
    the run's paths: the pipeline and the entry points carry the same trainer and phase values."""
    runs = pipeline_runs(parse_pipeline(CONFIG_DIR / f"{dataset}_pipeline.yaml"), tmp_path)
    assert [run.name for run in runs] == ["phase1_visual", "phase2_visual", "phase1_vl", "phase2_vl", "phase3_moe"]
    for name, cfg in phase_configs_of(runs, tmp_path).items():
        entry_point = CONFIG_DIR / f"{dataset}_{ENTRY_POINT_OF_PHASE[name]}.yaml"
        assert without_run_paths(cfg) == without_run_paths(parse_config(entry_point)), name


def test_lpt_mode_pipeline_phases_equal_the_single_phase_configs(tmp_path):
    """LPT mode: Places-LT's phase 1 with the expert without adapters (expert/visual_lpt.yaml), then its phase 2."""
    runs = pipeline_runs(parse_pipeline(CONFIG_DIR / "places_lt_lpt_pipeline.yaml"), tmp_path)
    code, out, err = run_print_config(CONFIG_DIR / "places_lt_phase1.yaml", "--model.init_args.expert",
                                      str(CONFIG_DIR / "expert" / "visual_lpt.yaml"))
    assert code == 0, err[-3000:]
    expected = {"phase1_visual": yaml.safe_load(out), "phase2_visual": parse_config(CONFIG_DIR / "places_lt_phase2.yaml")}
    configs = phase_configs_of(runs, tmp_path)
    assert list(configs) == list(expected)
    for name, cfg in configs.items():
        assert without_run_paths(cfg) == without_run_paths(expected[name]), name
    assert configs["phase1_visual"]["model"]["init_args"]["expert"]["adapters"] is False


README_PIPELINE_COMMANDS = readme_commands("pipeline")
# Where the piece given with an option lands in the parsed pipeline settings.
PIPELINE_OPTION_SECTION = {"--data": lambda settings: settings["data"], "--trainer": lambda settings: settings["trainer"]}
for _phase, _expert in itertools.product(("phase1", "phase2"), ("visual", "vl")):
    PIPELINE_OPTION_SECTION[f"--{_phase}.{_expert}.expert"] = (
        lambda settings, phase=_phase, expert=_expert: getattr(settings[phase], expert).expert)


@pytest.mark.parametrize("args", README_PIPELINE_COMMANDS,
                         ids=lambda args: "+".join(Path(a).stem for a in args if a.startswith("configs/")))
def test_readme_pipeline_combination_validates(args, monkeypatch, tmp_path):
    from lpt_lightning.pipeline_state import _validate_configs
    from lpt_lightning.pipeline_cli import parse

    monkeypatch.chdir(REPO)  # the README's commands run from the repository root
    settings = parse(args)
    given = [(option, Path(value)) for option, value in itertools.pairwise(args) if option in PIPELINE_OPTION_SECTION]
    assert given, "the command combines no pieces"
    for option, piece in given:
        overridden = {a.split("=", 1)[0].removeprefix(option + ".") for a in args if a.startswith(option + ".")}
        expected = {k: v for k, v in yaml.safe_load(piece.read_text()).items() if k not in overridden}
        assert not mismatches(PIPELINE_OPTION_SECTION[option](settings), expected, option), piece
    _validate_configs(pipeline_runs(settings, tmp_path))  # every phase parses with the real CLI parser


@pytest.mark.parametrize("path", PIPELINE_CONFIGS, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_lpt_prepare_reads_the_data_piece_a_pipeline_names(path):
    from lpt_lightning.prepare import source_from_config

    _, spec = source_from_config(str(path))
    assert spec == yaml.safe_load(pieces_named(path)["data"].read_text())["source"]


# ------------------------------------------------------------------ GPU data settings, prepared copies
@pytest.mark.parametrize("dataset", DATASETS)
def test_gpu_data_keeps_its_workers(dataset):
    """Workers outlive each epoch and evaluation (no restart of 8 decoders per loader)."""
    for path in (CONFIG_DIR / "data" / f"{dataset}.yaml", PREPARED[dataset]):
        raw = yaml.safe_load(path.read_text())
        assert raw["num_workers"] > 0 and raw["persistent_workers"] is True, path
    assert parse_config(CONFIG_DIR / f"{dataset}_phase3.yaml")["data"]["persistent_workers"] is True


@pytest.mark.parametrize("dataset", DATASETS)
def test_prepared_piece_is_the_dataset_piece_on_a_prepared_copy(dataset, tmp_path, monkeypatch):
    """The README recipe (`lpt prepare` into the piece's root, then `lpt pipeline ... --data
    data/<dataset>_prepared.yaml`): every phase reads PreparedSource with the dataset's other settings."""
    from lpt_lightning.pipeline_state import _validate_configs
    from lpt_lightning.pipeline_cli import parse

    raw = yaml.safe_load((CONFIG_DIR / "data" / f"{dataset}.yaml").read_text())
    prepared = yaml.safe_load(PREPARED[dataset].read_text())
    assert prepared["source"]["class_path"] == "lpt_lightning.data.PreparedSource"
    assert prepared["source"]["init_args"] == {"root": prepared["source"]["init_args"]["root"], "short_side": 256}
    assert prepared["source"]["init_args"]["root"].endswith("_256")  # lpt prepare's default --short_side
    assert {k: v for k, v in prepared.items() if k != "source"} == {k: v for k, v in raw.items() if k != "source"}
    monkeypatch.chdir(REPO)
    settings = parse(["--config", f"configs/{dataset}_pipeline.yaml", "--data", f"configs/data/{dataset}_prepared.yaml"])
    runs = pipeline_runs(settings, tmp_path)
    _validate_configs(runs)  # every phase parses with the real CLI parser
    for run in runs:
        assert not mismatches(run.config["data"], {k: v for k, v in prepared.items() if k != "sampling"}), run.name
    assert runs[-1].config["data"]["sampling"] == "class_aware"  # the scorer's, over the piece's dual
