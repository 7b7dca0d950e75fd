"""The ``lpt`` command: a LightningCLI over the phase LightningModules and one DataModule,
plus ``lpt pipeline`` (all phases), ``lpt export`` (trained tensors to safetensors) and ``lpt convert``
(checkpoints of other code bases).

Bad input ends in one message naming the file, line or option, exit code 2 and no traceback
(``--debug`` or ``LPT_DEBUG=1`` shows it); Ctrl-C or SIGTERM ends in one line saying how to resume.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import signal
import sys
import threading
from pathlib import Path
import warnings
from typing import Any

import lightning as L
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lpt_lightning.console import LogLines, plain_output, silence_noise
from lpt_lightning.data import LongTailDataModule
from lpt_lightning.errors import CheckpointError, ConfigError, LPTError, RunInterrupted
from lpt_lightning.prediction import PredictionWriter
from lpt_lightning.reports import SplitReport

# Frozen backbones are in eval mode on purpose (no dropout / drop-path while prompts train).
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
# `lpt pipeline` runs each phase's LightningCLI with explicit args while sys.argv keeps the
# pipeline command (the DDP launcher re-executes sys.argv in every rank).
warnings.filterwarnings("ignore", message=r".*args parameter is intended to run from within Python.*")
silence_noise()

# ckpt_path values Lightning resolves itself ("last" is resolved here, so that it is checked too).
LIGHTNING_CKPT_NAMES = ("best", "hpc")
SIGTERM_EXIT, SIGINT_EXIT = 128 + signal.SIGTERM, 128 + signal.SIGINT


class LPTCLI(LightningCLI):
    @staticmethod
    def defaults() -> dict[str, Any]:
        import lpt_lightning.phases  # noqa: F401  (registers the phase classes for class_path look-up)

        from lpt_lightning.reports import LoggedSaveConfig

        return dict(model_class=L.LightningModule, datamodule_class=LongTailDataModule, subclass_mode_model=True,
                    save_config_callback=LoggedSaveConfig, save_config_kwargs={"overwrite": True})

    def init_parser(self, **kwargs: Any):
        # argparse would take an abbreviation (--trainer.max_epoch) as the option it prefixes.
        kwargs.setdefault("allow_abbrev", False)
        # A parse error shows the error, not the 70-line usage of every option (--help has it).
        kwargs.setdefault("usage", "%(prog)s")
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        # The dataset defines the classes; the model is never configured separately.
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.init_args.class_names", apply_on="instantiate")
        # `lpt predict` writes top-k predictions (--prediction.output=preds.csv|.json, --prediction.top_k).
        parser.add_lightning_class_args(PredictionWriter, "prediction")
        # `lpt test` writes per-class tables and plots (and sends them to W&B when configured).
        parser.add_lightning_class_args(SplitReport, "report")
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="fit: delete the checkpoints an earlier run left in this run's directory and "
                                 "start afresh, replacing its config.yaml (without it such a directory is refused "
                                 "unless --ckpt_path resumes that run)")

    # ------------------------------------------------------------ ckpt_path, checked before Lightning reads it
    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the file here, before anything is built: the safe loader comes first.
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path and path not in (*LIGHTNING_CKPT_NAMES, "last"):
            self._ckpt_meta = (path, self._check_ckpt_path(path, self._model_phase(self.config[subcommand])))
        super()._parse_ckpt_path()

    @staticmethod
    def _model_phase(config) -> str | None:
        """The phase name of the configured model class (None for classes that are not phases)."""
        class_path = (config.get("model") or {}).get("class_path") or ""
        module, _, name = class_path.rpartition(".")
        try:
            return getattr(getattr(importlib.import_module(module), name), "phase_name", None) or None
        except (ImportError, AttributeError, ValueError):
            return None  # the parser has named a bad class_path already

    @staticmethod
    def _check_ckpt_path(path: str, phase: str | None) -> dict[str, Any]:
        """The checkpoint's metadata, after the checks of `lpt export` and model.phase1_checkpoint."""
        from lpt_lightning.checkpoints import check_phase_metadata, load_checkpoint_file, read_phase_metadata

        if Path(path).suffix == ".safetensors":
            raise CheckpointError(f"ckpt_path={path}: an export holds no trainer state; give the .ckpt it was "
                                  "exported from (an export can start phase 2 or 3 as model.init_args.*_checkpoint)")
        meta = read_phase_metadata(load_checkpoint_file(path), path)
        check_phase_metadata(meta, path, "ckpt_path", phase)
        return meta

    def _checkpoint_dirs(self) -> list[Path]:
        return [Path(cb.dirpath) for cb in self.trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]

    def _earlier_checkpoints(self) -> list[Path]:
        """Checkpoints in this run's directories: ModelCheckpoint's and SLURM's ``hpc_ckpt_N.ckpt``."""
        found = [p for d in self._checkpoint_dirs() for p in sorted(d.glob("*.ckpt"))]
        return found + sorted(Path(self.trainer.default_root_dir).glob("hpc_ckpt_*.ckpt"))

    def after_instantiate_classes(self) -> None:
        from lpt_lightning.data_facts import connect

        # The composition root: the model's image size to the data, the data's facts to the model.
        connect(self.model, self.datamodule)
        if self.subcommand is None:
            return
        config = self.config_init[self.subcommand]
        path = config.get("ckpt_path")
        phase, num_classes = getattr(self.model, "phase_name", None) or None, getattr(self.model, "num_classes", None)
        if path == "last":
            path = self._last_checkpoint()
            config["ckpt_path"] = path
        if path and path not in LIGHTNING_CKPT_NAMES:
            from lpt_lightning.checkpoints import check_phase_metadata

            checked, meta = getattr(self, "_ckpt_meta", (None, None))
            meta = meta if checked == path else self._check_ckpt_path(path, phase)
            check_phase_metadata(meta, path, "ckpt_path", num_classes=num_classes)
        if self.subcommand == "fit":
            self._check_run_directory(path)

    def _last_checkpoint(self) -> str:
        """``--ckpt_path=last``: the newest checkpoint of this run (as Lightning's "last", plus SLURM's)."""
        candidates = [p for p in self._earlier_checkpoints() if p.name.startswith(("last", "hpc_ckpt_"))]
        if not candidates:
            where = ", ".join(str(d) for d in self._checkpoint_dirs()) or self.trainer.default_root_dir
            raise ConfigError(f"ckpt_path=last: no checkpoint to resume in {where}; drop --ckpt_path to start afresh")
        return str(max(candidates, key=lambda p: p.stat().st_mtime))

    def _check_run_directory(self, ckpt_path: str | None) -> None:
        """A fresh run into a directory holding an earlier run's checkpoints would leave
        ``last.ckpt`` pointing at the old run (the new one writes ``last-v1.ckpt``): refuse it,
        unless ckpt_path resumes that run or --overwrite clears it."""
        earlier = self._earlier_checkpoints()
        if not earlier:
            return
        own = {os.path.realpath(d) for d in [*self._checkpoint_dirs(), Path(self.trainer.default_root_dir)]}
        if ckpt_path and os.path.realpath(Path(ckpt_path).absolute().parent) in own:
            return  # resuming this run: its ModelCheckpoint state makes it overwrite last.ckpt
        where = earlier[0].parent
        if self._get(self.config, "overwrite"):
            for p in earlier:
                p.unlink(missing_ok=True)  # every rank may try
            rank_zero_info(f"--overwrite: deleted {len(earlier)} checkpoints of an earlier run in {where}")
            return
        shown = ", ".join(p.name for p in earlier[:4]) + (f" and {len(earlier) - 4} more" if len(earlier) > 4 else "")
        raise ConfigError(
            f"{where} already holds checkpoints of an earlier run ({shown}). Resume it with --ckpt_path=last, "
            "write to a new directory (trainer.default_root_dir and the ModelCheckpoint dirpath), or start "
            "afresh with --overwrite=true (deletes those checkpoints)")

    def fit(self, model, **kwargs: Any) -> None:
        """``trainer.fit``, with Ctrl-C / SIGTERM turned into `RunInterrupted` (Lightning ends the
        former with ``sys.exit(1)``, the latter with ``SIGTERMException``)."""
        with _signal_handler(signal.SIGTERM, signal.SIG_DFL):  # Lightning's own handler stops at a batch end
            try:
                self.trainer.fit(model, **kwargs)
            except SystemExit as exc:
                if not self.trainer.interrupted:
                    raise
                resume = ("rerun with --ckpt_path=last to resume" if self._earlier_checkpoints()
                          else "no checkpoint was written yet: rerun the same command to start again")
                raise RunInterrupted(f"interrupted in phase {getattr(model, 'phase_name', '') or type(model).__name__} "
                                     f"({self.trainer.default_root_dir}); {resume}",
                                     SIGTERM_EXIT if isinstance(exc, SIGTERMException) else SIGINT_EXIT) from None

    def instantiate_trainer(self, **kwargs: Any):
        # Checkpoints are written atomically and read without unpickling code, unless the config
        # brings its own CheckpointIO.
        from lpt_lightning.checkpoints import AtomicCheckpointIO

        plugins = self._get(self.config_init, "trainer", default={}).get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        # A redirected log (SLURM) gets plain progress lines instead of progress-bar redraws.
        trainer = self._get(self.config_init, "trainer", default={})
        callbacks = trainer.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if plain_output() and trainer.get("enable_progress_bar") is not False and not any(
                isinstance(c, ProgressBar) for c in callbacks):
            callbacks = [*callbacks, LogLines()]
        # Seeding, the non-finite-loss policy and the class-mean head init, unless configured
        # (e.g. NonFiniteLossPolicy with on_nonfinite: skip in trainer.callbacks).
        from lpt_lightning.callbacks import default_callbacks

        callbacks = [*callbacks, *(d for d in default_callbacks() if not any(type(c) is type(d) for c in callbacks))]
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        root = Path(self.trainer.default_root_dir)
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe = root / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"trainer.default_root_dir={root} is not writable ({exc}); "
                              "choose a directory you can write to") from None

    def _print_results(self) -> None:
        from lpt_lightning.reports import split_table

        results = getattr(self.model, "results", None)
        if results:
            convention = getattr(self.model, "split_convention", "lpt")
            rank_zero_info(f"\nSplit accuracy (%, {convention} convention)\n{split_table(results)}")

    after_fit = after_validate = after_test = _print_results


def validate_config(config_path: str, subcommand: str = "fit") -> None:
    """Parse a LightningCLI config without building anything; ConfigError with the parser's message."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            LPTCLI(args=[subcommand, "--config", config_path, "--print_config"], **LPTCLI.defaults())
    except SystemExit as exc:
        if exc.code not in (0, None):
            lines = [ln for ln in err.getvalue().strip().splitlines() if ln and not ln.startswith("usage:")]
            raise ConfigError(f"{config_path}: " + ("\n".join(lines[-12:]) or "invalid configuration")) from None


# Sections of `lpt pipeline` that stay plain dicts: each phase's own LightningCLI parses them.
PIPELINE_DICT_SECTIONS = ("data", "trainer", "phase1", "phase2", "phase3")


def split_nested_overrides(args: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Take ``--data.source.init_args.root=DIR`` (or ``... DIR``) out of ``args`` as
    ``{"data": {"source": {"init_args": {"root": "DIR"}}}}``. jsonargparse sets a dotted key of a
    dict-typed argument one level deep only (``source`` would become ``{"init_args.root": DIR}``,
    dropping its class_path); these are merged into the sections as ``lpt fit`` merges them."""
    import yaml

    rest, nested = [], {}
    i = 0
    while i < len(args):
        arg = args[i]
        key = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        if key.split(".", 1)[0] in PIPELINE_DICT_SECTIONS and "." in key:
            if "=" in arg:
                value = arg.split("=", 1)[1]
            elif i + 1 < len(args):
                i += 1
                value = args[i]
            else:
                raise ConfigError(f"lpt pipeline: {arg} needs a value")
            node = nested
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = yaml.safe_load(value) if value else value
        else:
            rest.append(arg)
        i += 1
    return rest, nested


def pipeline_main(args: list[str]) -> None:
    from jsonargparse import ActionConfigFile, ArgumentParser

    from lpt_lightning.pipeline import merge, run_pipeline

    parser = ArgumentParser(prog="lpt pipeline", description=run_pipeline.__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--config", action=ActionConfigFile, help="pipeline YAML (configs/*_pipeline.yaml)")
    parser.add_function_arguments(run_pipeline, as_positional=False)
    args, overrides = split_nested_overrides(args)
    cfg = parser.parse_args(args).as_dict()
    cfg.pop("config", None)
    for section, override in overrides.items():
        cfg[section] = merge(cfg.get(section) or {}, override)
    if cfg.get("wandb") is not None:
        from lpt_lightning.pipeline import WandbSpec

        cfg["wandb"] = WandbSpec(**cfg["wandb"])
    run_pipeline(**cfg)


def export_main(args: list[str]) -> None:
    import argparse

    from lpt_lightning.checkpoints import export_safetensors

    parser = argparse.ArgumentParser(prog="lpt export", allow_abbrev=False, description="Write the trained tensors and metadata of a "
                                     "phase checkpoint to a .safetensors file (loadable wherever a checkpoint is).")
    parser.add_argument("checkpoint")
    parser.add_argument("output")
    ns = parser.parse_args(args)
    path = export_safetensors(ns.checkpoint, ns.output)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


def convert_main(args: list[str]) -> None:
    import argparse

    from lpt_lightning.convert import OFFICIAL_LAYER_NORM_EPS, convert_lpt_official
    from lpt_lightning.data.sources import _parse_class_names
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


@contextlib.contextmanager
def _signal_handler(signum: int, handler):
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return
    previous = signal.signal(signum, handler)
    try:
        yield
    finally:
        signal.signal(signum, previous)


def _terminated(signum, frame) -> None:
    raise RunInterrupted("terminated (SIGTERM)", SIGTERM_EXIT)


def dispatch(argv: list[str]) -> None:
    if argv and argv[0] == "pipeline":
        return pipeline_main(argv[1:])
    if argv and argv[0] == "export":
        return export_main(argv[1:])
    if argv and argv[0] == "convert":
        return convert_main(argv[1:])
    LPTCLI(args=argv, **LPTCLI.defaults())


def main(args: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in argv or os.environ.get("LPT_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    command = f"lpt {argv[0]}" if argv and not argv[0].startswith("-") else "lpt"
    try:
        with _signal_handler(signal.SIGTERM, _terminated):  # SIGTERM outside training: one line too
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
