"""Parsing of ``lpt fit | validate | test | predict``: the project's argument parser, the trainer
type it parses, the stop after parsing that `parse_config` uses, and the class a ``class_path``
section names."""
from __future__ import annotations

import importlib

from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser


class LPTTrainer(Trainer):
    """Lightning's Trainer with its batch limits typed ``int | float``: jsonargparse tries a
    Union's types in order, and Lightning's ``float | int`` turns ``limit_val_batches: 1`` (one
    batch) into 1.0 (every batch). Every other argument is the Trainer's own."""

    def __init__(self, *args, limit_train_batches: int | float | None = None,
                 limit_val_batches: int | float | None = None, limit_test_batches: int | float | None = None,
                 limit_predict_batches: int | float | None = None, overfit_batches: int | float = 0.0,
                 **kwargs) -> None:
        limits = dict(limit_train_batches=limit_train_batches, limit_val_batches=limit_val_batches,
                      limit_test_batches=limit_test_batches, limit_predict_batches=limit_predict_batches)
        # Unset limits stay unset, so Lightning's own defaults (and PL_TRAINER_* variables) apply.
        super().__init__(*args, overfit_batches=overfit_batches, **kwargs,
                         **{k: v for k, v in limits.items() if v is not None})


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
