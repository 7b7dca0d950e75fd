"""``ckpt_path`` of ``lpt fit | validate | test | predict``, checked before Lightning reads it: safe
loading, the checkpoint's phase and class count, ``last`` resolved to this run's newest
checkpoint, and an export for ``lpt predict`` rebuilding the model it holds."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from jsonargparse import Namespace

from lpt_lightning.checkpoints.files import load_checkpoint_file
from lpt_lightning.checkpoints.metadata import check_phase_metadata, read_phase_metadata
from lpt_lightning.cli_parsing import configured_class
from lpt_lightning.cli_run_dir import RunDirectoryGuards
from lpt_lightning.errors import CheckpointError, ConfigError
from lpt_lightning.prediction import export_model_config

# ckpt_path values Lightning resolves itself ("last" is resolved here, so that it is checked too and the model is
# rebuilt from that checkpoint's hyperparameters, as for an explicit path).
LIGHTNING_CKPT_NAMES = ("best", "hpc")


class CkptPathChecks(RunDirectoryGuards):
    """LightningCLI mixin: ``ckpt_path`` checked when parsed and once the model is built."""

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
        meta = self._check_ckpt_path(path, self._model_phase(config))
        model = export_model_config(path, meta)
        config.model = Namespace(class_path=model["class_path"], init_args=Namespace(**model["init_args"]))
        config.ckpt_path = None  # the model is built holding the trained tensors: nothing for Lightning to load

    @staticmethod
    def _model_phase(config) -> str | None:
        """The phase name of the configured model class (None for classes that are not phases)."""
        return getattr(configured_class(config.get("model")), "phase_name", None) or None

    @staticmethod
    def _check_ckpt_path(path: str, phase: str | None) -> dict[str, Any]:
        """The checkpoint's metadata, after the checks of `lpt export` and model.phase1_checkpoint."""
        meta = read_phase_metadata(load_checkpoint_file(path), path)
        check_phase_metadata(meta, path, "ckpt_path", phase)
        return meta

    def _last_checkpoint(self) -> str:
        """``--ckpt_path=last``: the newest checkpoint of this run (as Lightning's "last", plus SLURM's)."""
        candidates = [p for p in self._earlier_checkpoints() if p.name.startswith(("last", "hpc_ckpt_"))]
        if not candidates:
            where = ", ".join(str(d) for d in self._checkpoint_dirs()) or str(self._root_dir())
            raise ConfigError(f"ckpt_path=last: no checkpoint to resume in {where}; drop --ckpt_path to start afresh")
        return str(max(candidates, key=lambda p: p.stat().st_mtime))

    def _check_built_ckpt_path(self, path: str | None) -> None:
        """The checkpoint against the built model's phase and class count."""
        phase, num_classes = getattr(self.model, "phase_name", None) or None, getattr(self.model, "num_classes", None)
        if path and path not in LIGHTNING_CKPT_NAMES:
            checked, meta = getattr(self, "_ckpt_meta", (None, None))
            meta = meta if checked == path else self._check_ckpt_path(path, phase)
            check_phase_metadata(meta, path, "ckpt_path", num_classes=num_classes)
