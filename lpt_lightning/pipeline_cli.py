"""``lpt pipeline``: the command line of `run_pipeline`, parsed by jsonargparse from its signature
(typed phase sections included), with ``--config`` repeatable and merged section by section."""
from __future__ import annotations

from typing import Any

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from lpt_lightning.errors import ConfigError
from lpt_lightning.pipeline import PHASE_SECTIONS, WandbSpec, merge, run_pipeline


class MergingConfigFiles(ActionConfigFile):
    """``--config``, repeatable: a base file, then smaller pieces over it. jsonargparse merges
    typed sections field by field but replaces a dict-typed value whole; here a dict (``data``,
    ``trainer``, a phase's ``trainer`` / ``data`` / ``model`` / ``visual`` / ``vl``) set by an
    earlier file is merged key by key with the later one's (lists and scalars are replaced)."""

    def __call__(self, parser, cfg, values, option_string=None) -> None:
        before = cfg.clone()
        super().__call__(parser, cfg, values, option_string)
        for key, value in cfg.items():
            earlier = before.get(key)
            if isinstance(value, dict) and isinstance(earlier, dict):
                cfg[key] = merge(_plain(earlier), _plain(value))


def _plain(value: Any) -> Any:
    """``value`` with the Namespaces jsonargparse makes of class_path specs inside dicts as dicts."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def split_nested_overrides(args: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Take ``--data.source.init_args.root=DIR`` (or ``... DIR``) out of ``args`` as
    ``{"data": {"source": {"init_args": {"root": "DIR"}}}}``: every option below a dict-typed value
    (``--data.*``, ``--trainer.*``, ``--phase1.model.*``, ...). jsonargparse sets a dotted key of a
    dict one level deep only (``source`` would become ``{"init_args.root": DIR}``, dropping its
    class_path); `main` merges these into the sections as ``lpt fit`` merges them."""
    rest, nested = [], {}
    i = 0
    while i < len(args):
        arg = args[i]
        key = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        parts = key.split(".")
        if (parts[0] in ("data", "trainer") and len(parts) > 1) or (parts[0] in PHASE_SECTIONS and len(parts) > 2):
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
    parser = ArgumentParser(prog="lpt pipeline", description=run_pipeline.__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--config", action=MergingConfigFiles,
                        help="pipeline YAML (configs/*_pipeline.yaml); repeat it to combine pieces, later ones "
                             "merged over earlier ones")
    parser.add_function_arguments(run_pipeline, as_positional=False)
    return parser


def parse(args: list[str]) -> dict[str, Any]:
    """The keyword arguments of `run_pipeline` for ``lpt pipeline ARGS``, validated (sections typed)."""
    parser = command_parser()
    args, overrides = split_nested_overrides(args)
    if overrides:  # after every file, so they win, and validated with the rest
        # ... but before --print_config: jsonargparse prints the first config loaded after it.
        at = next((i for i, arg in enumerate(args) if arg.split("=")[0] == "--print_config"), len(args))
        args = [*args[:at], "--config", yaml.safe_dump(overrides), *args[at:]]
    settings = parser.parse_args(args).as_dict()
    settings.pop("config", None)
    for name, section in PHASE_SECTIONS.items():
        settings[name] = section(**settings[name])
    if settings["wandb"] is not None:
        settings["wandb"] = WandbSpec(**settings["wandb"])
    return settings


def main(args: list[str]) -> None:
    run_pipeline(**parse(args))
