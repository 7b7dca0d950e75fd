"""``lpt fit | validate | test | predict``: a LightningCLI over the phase LightningModules and one
DataModule. The `lpt` entry point (lpt_lightning/cli.py) and ``lpt pipeline`` both build on it;
it imports neither of them.
"""
from __future__ import annotations

import contextlib
import signal
import threading
import warnings
from argparse import ArgumentError
from typing import Any

import lightning as L
import torch
from jsonargparse import Namespace
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lpt_lightning.cli_ckpt_path import CkptPathChecks
from lpt_lightning.cli_parsing import LPTArgumentParser, LPTTrainer, ParsedOnly
from lpt_lightning.console import LogLines, plain_output, silence_noise
from lpt_lightning.data import LongTailDataModule
from lpt_lightning.errors import ConfigError, RunInterrupted
from lpt_lightning.precision import check_precision
from lpt_lightning.prediction import PredictionWriter
from lpt_lightning.reports import SplitReport

# Frozen backbones are in eval mode on purpose (no dropout / drop-path while prompts train).
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
# `lpt pipeline` runs each phase's LightningCLI with explicit args while sys.argv keeps the
# pipeline command (the DDP launcher re-executes sys.argv in every rank).
warnings.filterwarnings("ignore", message=r".*args parameter is intended to run from within Python.*")
silence_noise()

SIGTERM_EXIT, SIGINT_EXIT = 128 + signal.SIGTERM, 128 + signal.SIGINT


class LPTCLI(CkptPathChecks, LightningCLI):
    """LightningCLI with the project's parser settings (`cli_parsing`), checked ``ckpt_path``
    (`cli_ckpt_path`: safe loading, phase and class count; an export for ``predict``), run-directory
    guards (`cli_run_dir`), phase 3's fit on its experts' cached outputs, and clean interruptions.

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
                    parser_class=LPTArgumentParser, trainer_class=LPTTrainer)

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
            raise ParsedOnly(self.config)

    def after_instantiate_classes(self) -> None:
        from lpt_lightning.data_facts import connect

        # The composition root: the model's image size to the data, the data's facts to the model.
        connect(self.model, self.datamodule)
        if self.subcommand is None:
            return
        path = self.config_init[self.subcommand].get("ckpt_path")
        self._check_built_ckpt_path(path)
        if self.subcommand == "fit":
            self._check_run_directory(path)

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


    def before_test(self) -> None:
        """``--report.test_priors`` chooses its logit-adjustment tau on the val split: evaluate it
        first, with the weights the test uses (nothing to choose where val is, or serves as, test)."""
        from lpt_lightning.test_priors import tau_tuning_allowed

        asked = any(isinstance(c, SplitReport) and c.test_priors for c in self.trainer.callbacks)
        if asked and tau_tuning_allowed(self.datamodule):
            self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False,
                                  ckpt_path=self.config_init[self.subcommand].get("ckpt_path"))

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
    except ParsedOnly as parsed:
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
