"""The ``lpt`` command: LightningCLI's ``fit | validate | test | predict`` (lightning_cli.py) and
the subcommands of `SUBCOMMANDS` (``pipeline``, ``export``, ``convert``, ``prepare``, ``compare``),
each with its own ``--help``; ``lpt --help`` lists them all.

Bad input ends in one message naming the file, line or option, exit code 2 and no traceback
(``--debug`` or ``LPT_DEBUG=1`` shows it); Ctrl-C or SIGTERM ends in one line saying how to resume.
"""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from lightning.fabric.utilities.exceptions import MisconfigurationException

from lpt_lightning.errors import LPTError, RunInterrupted
from lpt_lightning.lightning_cli import LPTCLI, SIGINT_EXIT, SIGTERM_EXIT, signal_handler

# LightningCLI's subcommands (LPTCLI parses and runs them), with the line `lpt --help` shows.
LIGHTNING_SUBCOMMANDS = {
    "fit": "train one phase from its config (configs/<dataset>_phase*.yaml)",
    "validate": "evaluate a checkpoint on the validation (held-out) split",
    "test": "evaluate a checkpoint on the test split: overall / many / medium / few accuracy",
    "predict": "top-k classes for a folder or list of images, from a checkpoint or an export",
}


@dataclass(frozen=True)
class Subcommand:
    """An ``lpt`` subcommand besides LightningCLI's: ``entry`` names a ``main(argv)`` function
    ("module:function", imported only when the subcommand runs) that parses the arguments after
    the subcommand's name with a parser of its own (prog ``lpt NAME``, so ``--help`` works)."""

    entry: str
    help: str

    def run(self, argv: list[str]) -> None:
        module, _, function = self.entry.partition(":")
        getattr(importlib.import_module(module), function)(argv)


# Adding a subcommand is one line here.
SUBCOMMANDS = {
    "pipeline": Subcommand("lpt_lightning.pipeline_cli:main", "run every phase (1 and 2 per expert, then 3) "
                           "from one pipeline config (configs/<dataset>_pipeline.yaml)"),
    "export": Subcommand("lpt_lightning.cli:export_main", "write the trained tensors and metadata of a phase "
                         "checkpoint to one .safetensors file"),
    "convert": Subcommand("lpt_lightning.cli:convert_main", "convert a checkpoint of another code base "
                          "(the released LPT one) into phase checkpoints"),
    "prepare": Subcommand("lpt_lightning.prepare:main", "write a resized, sharded (LitData) or tree copy of a "
                          "dataset for fast loading on a cluster"),
    "compare": Subcommand("lpt_lightning.compare:main", "one table (and plot) of the rows of several phase or "
                          "pipeline runs, refusing runs evaluated on other test sets"),
}


def command_parser() -> argparse.ArgumentParser:
    """The parser of ``lpt`` itself: lists the subcommands. Each subcommand's arguments are parsed
    by that subcommand's own parser (see `dispatch`)."""
    parser = argparse.ArgumentParser(
        prog="lpt", description="LPT / LPT++: long-tailed classification with prompt-tuned frozen ViTs.",
        epilog="Each command has its own help: lpt COMMAND --help. --debug (or LPT_DEBUG=1) shows the "
               "traceback of an error.")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for name, text in {**LIGHTNING_SUBCOMMANDS, **{n: c.help for n, c in SUBCOMMANDS.items()}}.items():
        commands.add_parser(name, help=text, add_help=False)
    return parser


def dispatch(argv: list[str]) -> None:
    """Hand the arguments to the parser of the subcommand they start with (LightningCLI's take the
    whole command line, as ``lpt fit ...``); anything else gets ``lpt``'s help or its error."""
    name = argv[0] if argv else ""
    if name in SUBCOMMANDS:
        SUBCOMMANDS[name].run(argv[1:])
    elif name in LIGHTNING_SUBCOMMANDS:
        LPTCLI(args=argv, **LPTCLI.defaults())
    else:
        command_parser().parse_args(argv)  # --help, or an error naming the commands: exits either way


def export_main(args: list[str]) -> None:
    from lpt_lightning.checkpoints.files import export_safetensors

    parser = argparse.ArgumentParser(prog="lpt export", allow_abbrev=False, description="Write the trained tensors and metadata of a "
                                     "phase checkpoint to a .safetensors file (loadable wherever a checkpoint is).")
    parser.add_argument("checkpoint")
    parser.add_argument("output")
    ns = parser.parse_args(args)
    path = export_safetensors(ns.checkpoint, ns.output)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


def convert_main(args: list[str]) -> None:
    from lpt_lightning.convert import OFFICIAL_LAYER_NORM_EPS, convert_lpt_official
    from lpt_lightning.data.sources import parse_class_names as _parse_class_names
    from lpt_lightning.models.backbones import REFERENCE_BACKBONES, BackboneSpec

    parser = argparse.ArgumentParser(prog="lpt convert", allow_abbrev=False, description="Convert a checkpoint of another code base "
                                     "into phase checkpoints of this project.")
    formats = parser.add_subparsers(dest="format", required=True)
    official = formats.add_parser("lpt-official", help="the released LPT checkpoint of GitHub DongSky/LPT: "
                                  "writes a phase-2 checkpoint and, beside it, the phase-1 one it names")
    official.add_argument("source", help="official .pth file")
    official.add_argument("output", help="phase-2 checkpoint to write (.ckpt)")
    official.add_argument("--num-classes", type=int, required=True)
    official.add_argument("--class-names", help="file with one class per line ('name' or 'name index')")
    official.add_argument("--backbone", default=REFERENCE_BACKBONES["timm"], help="timm name of the frozen ViT")
    official.add_argument("--backbone-checkpoint", help="local weights of that ViT (recorded in the checkpoint and "
                          "compared with the backbone in the release); default: hub weights when the model is built")
    official.add_argument("--top-k", type=int, default=2, help="group prompts averaged per image")
    official.add_argument("--layer-norm-eps", type=float, default=OFFICIAL_LAYER_NORM_EPS)
    official.add_argument("--phase1-output", help="phase-1 checkpoint to write (default: OUTPUT with .phase1.ckpt)")
    ns = parser.parse_args(args)
    class_names = _parse_class_names(Path(ns.class_names)) if ns.class_names else None
    backbone = BackboneSpec(name=ns.backbone, checkpoint_path=ns.backbone_checkpoint)
    phase2, phase1 = convert_lpt_official(ns.source, ns.output, ns.num_classes, class_names, backbone, ns.top_k,
                                          ns.layer_norm_eps, ns.phase1_output)
    print(f"wrote {phase2} (phase 2) and {phase1} (phase 1)")


def project_error(exc: BaseException) -> BaseException | None:
    """The project's own error behind ``exc`` (jsonargparse raises ``Does not validate against
    any of the Union subtypes`` *from* an error raised while building a class), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, (LPTError, MisconfigurationException)):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__
    return None


def headline(exc: BaseException) -> str:
    """The message of ``exc``; a DataLoader worker re-raises it with the worker's traceback
    folded into the text, of which the last line is the message."""
    text = str(exc)
    if "\nOriginal Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


def _terminated(signum, frame) -> None:
    raise RunInterrupted("terminated (SIGTERM)", SIGTERM_EXIT)


def main(args: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in argv or os.environ.get("LPT_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    command = f"lpt {argv[0]}" if argv and not argv[0].startswith("-") else "lpt"
    try:
        with signal_handler(signal.SIGTERM, _terminated):  # SIGTERM outside training: one line too
            dispatch(argv)
    except (RunInterrupted, KeyboardInterrupt) as exc:
        if debug:
            raise
        message = str(exc) if isinstance(exc, RunInterrupted) else "interrupted (Ctrl-C)"
        print(f"{command}: {message}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", SIGINT_EXIT))
    except Exception as exc:
        error = project_error(exc)
        if error is None or debug:
            raise
        print(f"{command}: error: {headline(error)}\n(run with --debug or LPT_DEBUG=1 for the traceback)",
              file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
