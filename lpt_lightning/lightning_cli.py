"""``lpt fit | validate | test | predict``: a LightningCLI over the phase LightningModules and one
DataModule. The `lpt` entry point (lpt_lightning/cli.py) and ``lpt pipeline`` both build on it;
it imports neither of them.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import signal
import threading
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Any

import lightning as L
import torch
from jsonargparse import Namespace
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lpt_lightning.checkpoints.files import load_checkpoint_file
from lpt_lightning.checkpoints.metadata import check_phase_metadata, read_phase_metadata
from lpt_lightning.console import LogLines, plain_output, silence_noise
from lpt_lightning.data import LongTailDataModule
from lpt_lightning.errors import CheckpointError, ConfigError, RunInterrupted
from lpt_lightning.precision import check_precision
from lpt_lightning.prediction import PredictionWriter, export_model_config
from lpt_lightning.reports import SplitReport

# Frozen backbones are in eval mode on purpose (no dropout / drop-path while prompts train).
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
# `lpt pipeline` runs each phase's LightningCLI with explicit args while sys.argv keeps the
# pipeline command (the DDP launcher re-executes sys.argv in every rank).
warnings.filterwarnings("ignore", message=r".*args parameter is intended to run from within Python.*")
silence_noise()

# ckpt_path values Lightning resolves itself ("last" is resolved here, so that it is checked too and the model is
# rebuilt from that checkpoint's hyperparameters, as for an explicit path).
LIGHTNING_CKPT_NAMES = ("best", "hpc")
SIGTERM_EXIT, SIGINT_EXIT = 128 + signal.SIGTERM, 128 + signal.SIGINT


def set_aside_dir(folder: Path) -> Path:
    """Where `lpt fit --overwrite=true` keeps the earlier run's checkpoints of ``folder`` until the
    new run ends: a hidden sibling (inside, ModelCheckpoint would warn of a non-empty directory)."""
    return folder.parent / f".{folder.name}.lpt-overwritten"


class LPTArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, reporting an unknown key inside a nested class_path section in one line."""

    def error(self, message: str, ex: Exception | None = None):
        from lpt_lightning.parse_errors import nested_key_error

        # Only a parser that exits reports to the user (the parsers of nested sections raise into
        # its message; `parse_config` rewrites what its parser raises).
        args = getattr(self, "args", None) or []
        return super().error((self.exit_on_error and nested_key_error(message, args)) or message, ex)


class _Parsed(Exception):
    """Ends an ``LPTCLI(parse_only=True)`` right after parsing: nothing is seeded, built or run."""

    def __init__(self, config: Namespace) -> None:
        super().__init__("parsed")
        self.config = config


class LPTCLI(LightningCLI):
    """LightningCLI with the project's parser settings, checked ``ckpt_path`` (safe loading, phase
    and class count; an export for ``predict``), run-directory guards and clean interruptions.

    ``parse_only=True`` stops after parsing and validation (see `parse_config`).
    """

    def __init__(self, *args: Any, parse_only: bool = False, **kwargs: Any) -> None:
        self.parse_only = parse_only
        super().__init__(*args, **kwargs)

    @staticmethod
    def defaults() -> dict[str, Any]:
        import lpt_lightning.phases  # noqa: F401  (registers the phase classes for class_path look-up)

        from lpt_lightning.reports import LoggedSaveConfig

        return dict(model_class=L.LightningModule, datamodule_class=LongTailDataModule, subclass_mode_model=True,
                    save_config_callback=LoggedSaveConfig, save_config_kwargs={"overwrite": True},
                    parser_class=LPTArgumentParser)

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
                            help="fit: start afresh in a directory holding an earlier run's checkpoints and "
                                 "config.yaml, replacing them (the checkpoints are set aside, deleted when the new "
                                 "run ends having written one of its own, put back if it fails before); without "
                                 "it such a directory is refused unless --ckpt_path resumes that run")

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        check_precision(self._trainer_config().get("precision") or "32-true")  # before anything is built
        if self.parse_only:
            raise _Parsed(self.config)

    # ------------------------------------------------------------ ckpt_path, checked before Lightning reads it
    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the file here, before anything is built: the safe loader comes first.
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path == "last":  # the concrete file, so that Lightning reads its hyperparameters: no upstream file is needed
            path = self.config[subcommand].ckpt_path = self._last_checkpoint()
        if path and Path(path).suffix == ".safetensors":
            self._use_export(subcommand, path)
            return
        if path and path not in LIGHTNING_CKPT_NAMES:
            self._ckpt_meta = (path, self._check_ckpt_path(path, self._model_phase(self.config[subcommand])))
        super()._parse_ckpt_path()

    def _use_export(self, subcommand: str, path: str) -> None:
        """``lpt predict --ckpt_path EXPORT``: the model is rebuilt from the export alone (its tensors
        and metadata; the frozen backbones from their hub name or file), chosen by the phase in its
        metadata, instead of from the config's model section, whose upstream checkpoints may be gone.
        The config still gives the data and the trainer; its model class must be of the export's phase."""
        if subcommand != "predict":
            raise CheckpointError(f"ckpt_path={path}: an export holds no trainer state; give the .ckpt it was "
                                  f"exported from to `lpt {subcommand}` (`lpt predict` takes an export, and an "
                                  "export can start phase 2 or 3 as model.init_args.*_checkpoint)")
        config = self.config[subcommand]
        meta = read_phase_metadata(load_checkpoint_file(path), path)
        check_phase_metadata(meta, path, "ckpt_path", self._model_phase(config))
        model = export_model_config(path, meta)
        config.model = Namespace(class_path=model["class_path"], init_args=Namespace(**model["init_args"]))
        config.ckpt_path = None  # the model is built holding the trained tensors: nothing for Lightning to load

    @staticmethod
    def _model_phase(config) -> str | None:
        """The phase name of the configured model class (None for classes that are not phases)."""
        return getattr(_configured_class(config.get("model")), "phase_name", None) or None

    @staticmethod
    def _check_ckpt_path(path: str, phase: str | None) -> dict[str, Any]:
        """The checkpoint's metadata, after the checks of `lpt export` and model.phase1_checkpoint."""
        meta = read_phase_metadata(load_checkpoint_file(path), path)
        check_phase_metadata(meta, path, "ckpt_path", phase)
        return meta

    def _trainer_config(self) -> Namespace:
        subcommand = self.config.get("subcommand")
        return (self.config[subcommand] if subcommand else self.config).trainer

    def _checkpoint_dirs(self) -> list[Path]:
        """The configured ModelCheckpoints' directories, read from the config: known before anything is built."""
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks = self._trainer_config().get("callbacks") or []
        dirs = []
        for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
            cls = _configured_class(callback)
            is_checkpoint = isinstance(cls, type) and issubclass(cls, ModelCheckpoint)
            dirpath = (callback.get("init_args") or {}).get("dirpath") if is_checkpoint else None
            if dirpath:
                dirs.append(Path(os.path.realpath(os.path.expanduser(dirpath))))  # as ModelCheckpoint resolves it
        return dirs

    def _root_dir(self) -> Path:
        return Path(self._trainer_config().get("default_root_dir") or os.getcwd())

    def _earlier_checkpoints(self) -> list[Path]:
        """Checkpoints in this run's directories: ModelCheckpoint's and SLURM's ``hpc_ckpt_N.ckpt``."""
        found = [p for d in self._checkpoint_dirs() for p in sorted(d.glob("*.ckpt"))]
        return found + sorted(self._root_dir().glob("hpc_ckpt_*.ckpt"))

    def after_instantiate_classes(self) -> None:
        from lpt_lightning.data_facts import connect

        # The composition root: the model's image size to the data, the data's facts to the model.
        connect(self.model, self.datamodule)
        if self.subcommand is None:
            return
        config = self.config_init[self.subcommand]
        path = config.get("ckpt_path")
        phase, num_classes = getattr(self.model, "phase_name", None) or None, getattr(self.model, "num_classes", None)
        if path and path not in LIGHTNING_CKPT_NAMES:
            checked, meta = getattr(self, "_ckpt_meta", (None, None))
            meta = meta if checked == path else self._check_ckpt_path(path, phase)
            check_phase_metadata(meta, path, "ckpt_path", num_classes=num_classes)
        if self.subcommand == "fit":
            self._check_run_directory(path)

    def _last_checkpoint(self) -> str:
        """``--ckpt_path=last``: the newest checkpoint of this run (as Lightning's "last", plus SLURM's)."""
        candidates = [p for p in self._earlier_checkpoints() if p.name.startswith(("last", "hpc_ckpt_"))]
        if not candidates:
            where = ", ".join(str(d) for d in self._checkpoint_dirs()) or str(self._root_dir())
            raise ConfigError(f"ckpt_path=last: no checkpoint to resume in {where}; drop --ckpt_path to start afresh")
        return str(max(candidates, key=lambda p: p.stat().st_mtime))

    def _check_run_directory(self, ckpt_path: str | None) -> None:
        """A fresh run into a directory holding an earlier run's checkpoints would leave
        ``last.ckpt`` pointing at the old run (the new one writes ``last-v1.ckpt``): refuse it,
        unless ckpt_path resumes that run or --overwrite replaces it."""
        if self.trainer.is_global_zero:
            self._settle_set_aside(finished=False)  # left by an --overwrite run that was killed
        earlier = self._earlier_checkpoints()
        if not earlier:
            return
        own = {os.path.realpath(d) for d in [*self._checkpoint_dirs(), Path(self.trainer.default_root_dir)]}
        if ckpt_path and os.path.realpath(Path(ckpt_path).absolute().parent) in own:
            return  # resuming this run: its ModelCheckpoint state makes it overwrite last.ckpt
        if self._get(self.config, "overwrite"):
            self._overwrite = earlier  # set aside by `fit`, settled when the run ends
            return
        where = earlier[0].parent
        shown = ", ".join(p.name for p in earlier[:4]) + (f" and {len(earlier) - 4} more" if len(earlier) > 4 else "")
        raise ConfigError(
            f"{where} already holds checkpoints of an earlier run ({shown}). Resume it with --ckpt_path=last, "
            "write to a new directory (trainer.default_root_dir and the ModelCheckpoint dirpath), or start "
            "afresh with --overwrite=true (deletes those checkpoints)")

    def fit(self, model, **kwargs: Any) -> None:
        """``trainer.fit``, with Ctrl-C / SIGTERM turned into `RunInterrupted` (Lightning ends the
        former with ``sys.exit(1)``, the latter with ``SIGTERMException``)."""
        set_aside = self.trainer.is_global_zero and self._set_aside(getattr(self, "_overwrite", []))
        finished = False
        with signal_handler(signal.SIGTERM, signal.SIG_DFL):  # Lightning's own handler stops at a batch end
            try:
                if getattr(model, "phase_name", None) == "moe_scorer":  # fits on the experts' cached outputs
                    from lpt_lightning.phases.moe_scorer import scorer_fit_data

                    # The outputs pass runs this trainer's predict loop, so it is interruptible alike.
                    kwargs["datamodule"] = scorer_fit_data(model, kwargs["datamodule"], self.trainer)
                self.trainer.fit(model, **kwargs)
                finished = not self.trainer.interrupted
            except SystemExit as exc:
                if not self.trainer.interrupted:
                    raise
                resume = ("rerun with --ckpt_path=last to resume" if self._earlier_checkpoints()
                          else "no checkpoint was written yet: rerun the same command to start again")
                raise RunInterrupted(f"interrupted in phase {getattr(model, 'phase_name', '') or type(model).__name__} "
                                     f"({self.trainer.default_root_dir}); {resume}",
                                     SIGTERM_EXIT if isinstance(exc, SIGTERMException) else SIGINT_EXIT) from None
            finally:
                if set_aside:
                    self._settle_set_aside(finished)

    def predict(self, model, **kwargs: Any) -> None:
        """``trainer.predict`` without collecting every batch's [B, C] probabilities: the command
        never reads them (PredictionWriter writes each batch's rows), and they grow with the images."""
        self.trainer.predict(model, **{**kwargs, "return_predictions": False})

    # ------------------------------------------------------------ --overwrite, undone by a run that fails early
    def _set_aside(self, earlier: list[Path]) -> bool:
        """Move an earlier run's checkpoints into a hidden folder beside their own: out of the way of
        the new run's file names (it writes last.ckpt, not last-v1.ckpt) and of SLURM's auto-resume,
        but back in place if the new run fails before it writes its first checkpoint (e.g. on a bad image)."""
        for p in earlier:
            aside = set_aside_dir(Path(os.path.realpath(p.parent)))  # as `_settle_set_aside` finds it
            aside.mkdir(exist_ok=True)
            os.replace(p, aside / p.name)
        return bool(earlier)

    def _settle_set_aside(self, finished: bool) -> None:
        """Delete the set-aside checkpoints once the new run has finished or written one of its own;
        otherwise put them back."""
        dirs = [d for d in {*self._checkpoint_dirs(), Path(os.path.realpath(self._root_dir()))}
                if set_aside_dir(d).is_dir()]
        if not dirs:
            return
        replaced = finished or bool(self._earlier_checkpoints())
        count = 0
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
            for p in set_aside_dir(d).iterdir():
                if replaced:
                    p.unlink()
                else:
                    os.replace(p, d / p.name)
                count += 1
            set_aside_dir(d).rmdir()
        where = ", ".join(str(d) for d in dirs)
        rank_zero_info(f"--overwrite: deleted {count} checkpoints of an earlier run in {where}" if replaced else
                       f"--overwrite: the run stopped before writing a checkpoint; the earlier run's {count} "
                       f"checkpoints are back in {where}")

    def instantiate_trainer(self, **kwargs: Any):
        # Checkpoints are written atomically and read without unpickling code, unless the config
        # brings its own CheckpointIO.
        from lpt_lightning.checkpoints.files import AtomicCheckpointIO

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
        return tune_for_hardware(super().instantiate_trainer(**kwargs))

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
            table = split_table(results, getattr(self.model, "class_names", None))
            rank_zero_info(f"\nSplit accuracy (%, {convention} convention)\n{table}")

    after_fit = after_validate = after_test = _print_results


def tune_for_hardware(trainer: L.Trainer) -> L.Trainer:
    """The settings every run on GPUs wants, unless already chosen: TF32 matmuls on CUDA (float32
    matmul precision ``high`` where it is PyTorch's default ``highest``; the frozen ViTs' fp32 matmuls
    run on tensor cores) and DDP without the per-step buffer broadcast (``broadcast_buffers=False``:
    the modules' buffers are constants, identical on every rank: normalisation, class counts, W_base)."""
    if isinstance(trainer.accelerator, CUDAAccelerator) and torch.get_float32_matmul_precision() == "highest":
        torch.set_float32_matmul_precision("high")
    if isinstance(trainer.strategy, DDPStrategy):
        trainer.strategy._ddp_kwargs.setdefault("broadcast_buffers", False)  # DDPStrategy(**kwargs) for DDP
    return trainer


def parse_config(args: list[str]) -> Namespace:
    """``lpt SUBCOMMAND ARGS`` parsed and validated by the command's own parser (types, class
    paths, unknown keys); nothing is seeded, built or run. A ConfigError carries the parser's message."""
    # Parse errors are raised, not printed with the usage and turned into an exit.
    raising = {"exit_on_error": False, **{name: {"exit_on_error": False} for name in LPTCLI.subcommands()}}
    try:
        LPTCLI(args=args, parse_only=True, parser_kwargs=raising, **LPTCLI.defaults())
    except _Parsed as parsed:
        return parsed.config
    except ArgumentError as exc:
        from lpt_lightning.parse_errors import nested_key_error

        raise ConfigError(nested_key_error(str(exc), args) or str(exc)) from None


def validate_config(config_path: str, subcommand: str = "fit") -> None:
    """Check a phase config as ``lpt SUBCOMMAND --config CONFIG_PATH`` would; ConfigError naming the file."""
    try:
        parse_config([subcommand, "--config", config_path])
    except ConfigError as exc:
        raise ConfigError(str(exc) if str(exc).startswith(config_path) else f"{config_path}: {exc}") from None


def _configured_class(config) -> type | None:
    """The class a ``class_path`` config section names (None if it names none: the parser has said so already)."""
    class_path = (config or {}).get("class_path") or ""
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


@contextlib.contextmanager
def signal_handler(signum: int, handler):
    """``handler`` for ``signum`` within the block (outside the main thread, where Python has no
    signal handlers, the block runs unchanged)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signum, handler)
    try:
        yield
    finally:
        signal.signal(signum, previous)
