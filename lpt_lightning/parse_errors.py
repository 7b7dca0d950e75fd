"""One line for an unknown key inside a class_path section of an ``lpt fit`` config.

jsonargparse reports ``model.init_args.optim.base_lrr`` as a 20-line tree of union errors that
starts with ``Parser key "model":`` and names the key 14 lines down; `nested_key_error` turns it
into ``FILE: model.init_args.optim.base_lrr is not an option of OptimSpec; did you mean base_lr?``.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import re
from pathlib import Path
from typing import Any

import yaml

_NOT_ACCEPTED = re.compile(r"Option '([^']+)' is not accepted")
_PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
_CLASS_PATH = re.compile(r"Problem with given class_path '([^']+)'")


def nested_key_error(message: str, args: list[str]) -> str | None:
    """``message`` in one line, if it is jsonargparse's report of a key that the class of a
    nested section does not accept; None for any other message. ``args``: the command line, whose
    config files are searched for the key (the last file holding it is named)."""
    lines = message.splitlines()
    at = next((i for i, line in enumerate(lines) if _NOT_ACCEPTED.search(line)), None)
    if at is None or not _PARSER_KEY.search(lines[0]):
        return None
    option = _NOT_ACCEPTED.search(lines[at]).group(1)
    # The sections above the cause: each line less indented than the last one kept is its parent.
    keys, class_path, indent = [], None, _indent(lines[at])
    for line in reversed(lines[:at]):
        if _indent(line) < indent:
            indent = _indent(line)
            if match := _PARSER_KEY.search(line):
                keys.insert(0, match.group(1))
            elif class_path is None and (match := _CLASS_PATH.search(line)):
                class_path = match.group(1)
    parts = [*keys, *option.split(".")]
    where, path = _written_at(parts, args)
    text = f"{where}: {'.'.join(path)}" if where else f"--{'.'.join(path)}"
    if class_path:
        text += f" is not an option of {class_path}"
        close = difflib.get_close_matches(parts[-1], _options(class_path), n=1)
        text += f"; did you mean {close[0]}?" if close else f"; its options: {', '.join(_options(class_path))}"
    else:
        text += " is not accepted"
    return text


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" -"))


def _written_at(parts: list[str], args: list[str]) -> tuple[str | None, list[str]]:
    """The last config file on the command line that holds the key, and its path there
    (``init_args`` included where the file has it); (None, path) if no file holds it (the option's
    path as given, if one is)."""
    for config in reversed(_config_files(args)):
        try:
            tree = yaml.safe_load(Path(config).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        path = _key_path(tree, parts)
        if path is not None:
            return config, path
    for arg in args:  # an option: --model.init_args.optim.base_lrr=0.1
        key = arg[2:].split("=", 1)[0].split(".") if arg.startswith("--") else []
        if [k for k in key if k != "init_args"] == parts:
            return None, key
    return None, parts


def _config_files(args: list[str]) -> list[str]:
    files = []
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            files.append(args[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def _key_path(node: Any, parts: list[str]) -> list[str] | None:
    """Where ``parts`` lies in ``node``, an ``init_args`` allowed before each part."""
    if not parts:
        return []
    if not isinstance(node, dict):
        return None
    if parts[0] in node and (rest := _key_path(node[parts[0]], parts[1:])) is not None:
        return [parts[0], *rest]
    if "init_args" in node and (rest := _key_path(node["init_args"], parts)) is not None:
        return ["init_args", *rest]
    return None


def _options(class_path: str) -> list[str]:
    """The keys the class at ``class_path`` accepts: a dataclass's fields, or its __init__'s arguments."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls)]
    return [p.name for p in inspect.signature(cls.__init__).parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
