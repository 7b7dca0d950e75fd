"""``lpt pipeline``: the command line of `run_pipeline`, parsed by jsonargparse from its signature
(typed phase sections included), with ``--config`` repeatable and merged section by section.

``data`` and ``trainer`` are parsed as LongTailDataModule's and Trainer's arguments and each
expert's ``expert`` as an ExpertSpec, so each can name a piece file (``data: data/inat18.yaml``,
relative to the config naming it) as in an ``lpt fit`` config; `run_pipeline` gets their plain
values, every default filled in."""
from __future__ import annotations

from dataclasses import is_dataclass
from typing import Any, get_args, get_origin, get_type_hints

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from lpt_lightning.cli_parsing import LPTTrainer
from lpt_lightning.data import LongTailDataModule
from lpt_lightning.errors import ConfigError
from lpt_lightning.pipeline import run_pipeline
from lpt_lightning.pipeline_plan import PHASE_SECTIONS, WandbSpec, merge, phase_section


class MergingConfigFiles(ActionConfigFile):
    """``--config``, repeatable: a base file, then smaller pieces over it. jsonargparse merges
    typed sections field by field but replaces a dict-typed value whole; here a dict section (a
    phase's ``trainer`` / ``data`` / ``model``, an expert's ``loss`` / ``optim`` / ``group_prompts``)
    set by an earlier file is merged key by key with the later one's (lists and scalars are
    replaced). Dicts inside typed values (an expert's ``backbone.model_kwargs``) are replaced, as
    ``lpt fit`` replaces them: a later expert piece brings its whole architecture."""

    def __call__(self, parser, cfg, values, option_string=None) -> None:
        before = cfg.clone()
        super().__call__(parser, cfg, values, option_string)
        for key in DICT_SECTIONS:
            value, earlier = cfg.get(key), before.get(key)
            if isinstance(value, dict) and isinstance(earlier, dict):
                cfg[key] = merge(_plain(earlier), _plain(value))


def _dict_fields(prefix: str, kind: type) -> list[str]:
    """The dict-typed fields of a section dataclass and of the dataclasses it nests, as dotted keys."""
    keys = []
    for name, hint in get_type_hints(kind).items():
        if is_dataclass(hint):
            keys += _dict_fields(f"{prefix}.{name}", hint)
        elif any(get_origin(arg) is dict for arg in get_args(hint)):
            keys.append(f"{prefix}.{name}")
    return keys


DICT_SECTIONS = [key for name, kind in PHASE_SECTIONS.items() for key in _dict_fields(name, kind)]


def _plain(value: Any) -> Any:
    """``value`` with the Namespaces jsonargparse makes of class_path specs inside dicts as dicts."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def split_nested_overrides(args: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Take ``--data.source.init_args.root=DIR`` (or ``... DIR``) out of ``args`` as
    ``{"data": {"source": {"init_args": {"root": "DIR"}}}}``: every option below a phase's dict
    sections (``--phase1.model.*``, ...), where jsonargparse sets a dotted key one level deep only
    (``optim.base_lr`` would become a key of ``model``), and, so that they too apply after every
    file, below ``data`` and ``trainer``. `main` merges these into the sections as ``lpt fit``
    merges them. An expert's options (``--phase1.visual.expert.backbone.checkpoint_path``) are
    typed and left to jsonargparse, as ``lpt fit`` leaves ``--model.init_args.expert.*``."""
    rest, nested = [], {}
    i = 0
    while i < len(args):
        arg = args[i]
        key = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        parts = key.split(".")
        if (parts[0] in ("data", "trainer") and len(parts) > 1) or (
                parts[0] in PHASE_SECTIONS and len(parts) > 2 and parts[1] not in ("visual", "vl")):
            if "=" in arg:
                value = arg.split("=", 1)[1]
            elif i + 1 < len(args):
                i += 1
                value = args[i]
            else:
                raise ConfigError(f"lpt pipeline: {arg} needs a value")
            node = nested
            *parents, leaf = parts
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = yaml.safe_load(value) if value else value
        else:
            rest.append(arg)
        i += 1
    return rest, nested


def command_parser() -> ArgumentParser:
    # usage: a parse error shows the error, not the usage of every trainer and data option (--help has them).
    parser = ArgumentParser(prog="lpt pipeline", description=run_pipeline.__doc__.splitlines()[0], allow_abbrev=False,
                            usage="%(prog)s")
    parser.add_argument("--config", action=MergingConfigFiles,
                        help="pipeline YAML (configs/*_pipeline.yaml); repeat it to combine pieces, later ones "
                             "merged over earlier ones")
    # sub_configs: an expert (phase1.visual.expert) or the wandb section may be a file.
    parser.add_function_arguments(run_pipeline, as_positional=False, skip={"data", "trainer"}, sub_configs=True)
    parser.add_class_arguments(LongTailDataModule, "data", sub_configs=True, instantiate=False)
    parser.add_class_arguments(LPTTrainer, "trainer", sub_configs=True, instantiate=False, fail_untyped=False)
    return parser


def parse(args: list[str]) -> dict[str, Any]:
    """The keyword arguments of `run_pipeline` for ``lpt pipeline ARGS``, validated (sections typed)."""
    parser = command_parser()
    args, overrides = split_nested_overrides(args)
    if overrides:  # after every file, so they win, and validated with the rest
        # ... but before --print_config: jsonargparse prints the first config loaded after it.
        at = next((i for i, arg in enumerate(args) if arg.split("=")[0] == "--print_config"), len(args))
        args = [*args[:at], "--config", yaml.safe_dump(overrides), *args[at:]]
    # Without the paths of the pieces read (the "__path__" jsonargparse records beside their values).
    settings = parser.parse_args(args).clone(with_meta=False).as_dict()
    settings.pop("config", None)
    for name in PHASE_SECTIONS:
        settings[name] = phase_section(name, settings[name])
    if settings["wandb"] is not None:
        settings["wandb"] = WandbSpec(**settings["wandb"])
    return settings


def main(args: list[str]) -> None:
    run_pipeline(**parse(args))
