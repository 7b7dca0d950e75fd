"""The ``lpt`` command: a LightningCLI over the phase LightningModules and one DataModule,
plus ``lpt pipeline`` (all phases), ``lpt export`` (trained tensors to safetensors) and ``lpt convert``
(checkpoints of other code bases)."""
from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path
import warnings
from typing import Any

import lightning as L
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lpt_lightning.data import LongTailDataModule
from lpt_lightning.errors import ConfigError
from lpt_lightning.prediction import PredictionWriter
from lpt_lightning.reports import SplitReport

# Frozen backbones are in eval mode on purpose (no dropout / drop-path while prompts train).
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
# `lpt pipeline` runs each phase's LightningCLI with explicit args while sys.argv keeps the
# pipeline command (the DDP launcher re-executes sys.argv in every rank).
warnings.filterwarnings("ignore", message=r".*args parameter is intended to run from within Python.*")


class LPTCLI(LightningCLI):
    @staticmethod
    def defaults() -> dict[str, Any]:
        import lpt_lightning.phases  # noqa: F401  (registers the phase classes for class_path look-up)

        from lpt_lightning.reports import LoggedSaveConfig

        return dict(model_class=L.LightningModule, datamodule_class=LongTailDataModule, subclass_mode_model=True,
                    save_config_callback=LoggedSaveConfig, save_config_kwargs={"overwrite": True})

    def add_arguments_to_parser(self, parser) -> None:
        # The dataset defines the classes; the model is never configured separately.
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.init_args.class_names", apply_on="instantiate")
        # `lpt predict` writes top-k predictions (--prediction.output=preds.csv|.json, --prediction.top_k).
        parser.add_lightning_class_args(PredictionWriter, "prediction")
        # `lpt test` writes per-class tables and plots (and sends them to W&B when configured).
        parser.add_lightning_class_args(SplitReport, "report")

    def instantiate_trainer(self, **kwargs: Any):
        # Checkpoints are written atomically and read without unpickling code, unless the config
        # brings its own CheckpointIO.
        from lpt_lightning.checkpoints import AtomicCheckpointIO

        plugins = self._get(self.config_init, "trainer", default={}).get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
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


def pipeline_main(args: list[str]) -> None:
    from jsonargparse import ActionConfigFile, ArgumentParser

    from lpt_lightning.pipeline import run_pipeline

    parser = ArgumentParser(prog="lpt pipeline", description=run_pipeline.__doc__.splitlines()[0])
    parser.add_argument("--config", action=ActionConfigFile, help="pipeline YAML (configs/*_pipeline.yaml)")
    parser.add_function_arguments(run_pipeline, as_positional=False)
    # Phase sections stay plain dicts: each phase's own LightningCLI parses and builds them.
    cfg = parser.parse_args(args).as_dict()
    cfg.pop("config", None)
    if cfg.get("wandb") is not None:
        from lpt_lightning.pipeline import WandbSpec

        cfg["wandb"] = WandbSpec(**cfg["wandb"])
    run_pipeline(**cfg)


def export_main(args: list[str]) -> None:
    import argparse

    from lpt_lightning.checkpoints import export_safetensors

    parser = argparse.ArgumentParser(prog="lpt export", description="Write the trained tensors and metadata of a "
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

    parser = argparse.ArgumentParser(prog="lpt convert", description="Convert a checkpoint of another code base "
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


def main(args: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "pipeline":
        return pipeline_main(argv[1:])
    if argv and argv[0] == "export":
        return export_main(argv[1:])
    if argv and argv[0] == "convert":
        return convert_main(argv[1:])
    LPTCLI(args=args, **LPTCLI.defaults())


if __name__ == "__main__":
    main()
