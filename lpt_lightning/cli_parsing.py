"""Parsing of ``lpt fit | validate | test | predict``: the project's argument parser, the stop
after parsing that `parse_config` uses, and the class a ``class_path`` section names."""
from __future__ import annotations

import importlib

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser


class LPTArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, reporting an unknown key inside a nested class_path section in one line."""

    def error(self, message: str, ex: Exception | None = None):
        from lpt_lightning.parse_errors import nested_key_error

        # Only a parser that exits reports to the user (the parsers of nested sections raise into
        # its message; `parse_config` rewrites what its parser raises).
        args = getattr(self, "args", None) or []
        return super().error((self.exit_on_error and nested_key_error(message, args)) or message, ex)


class ParsedOnly(Exception):
    """Ends an ``LPTCLI(parse_only=True)`` right after parsing: nothing is seeded, built or run."""

    def __init__(self, config: Namespace) -> None:
        super().__init__("parsed")
        self.config = config


def configured_class(config) -> type | None:
    """The class a ``class_path`` config section names (None if it names none: the parser has said so already)."""
    class_path = (config or {}).get("class_path") or ""
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
