"""The ``lpt`` command: a LightningCLI over the phase LightningModules and one DataModule."""
from __future__ import annotations

import warnings

import lightning as L
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lpt_lightning.data import LongTailDataModule
from lpt_lightning.metrics import format_split_table

# Frozen backbones are in eval mode on purpose (no dropout / drop-path while prompts train).
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")


class LPTCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The dataset defines the classes; the model is never configured separately.
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.init_args.class_names", apply_on="instantiate")

    def _print_results(self) -> None:
        results = getattr(self.model, "results", None)
        if results:
            rows = {stage: values for stage, values in results.items()}
            rank_zero_info(f"\nSplit accuracy (%, {getattr(self.model, 'split_convention', 'lpt')} convention)\n"
                           + format_split_table(rows))

    after_fit = after_validate = after_test = _print_results


def main(args: list[str] | None = None) -> None:
    import lpt_lightning.phases  # noqa: F401  (registers the phase classes for class_path look-up)

    LPTCLI(
        model_class=L.LightningModule,
        datamodule_class=LongTailDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
