"""The run directory of ``lpt fit``: the earlier run's checkpoints found from the config before
anything is built, a fresh run over them refused or (``--overwrite``) set aside, and put back if
the new run fails before writing one of its own; the directory checked writable."""
from __future__ import annotations

import os
from pathlib import Path

from jsonargparse import Namespace
from lightning.pytorch.utilities import rank_zero_info

from lpt_lightning.cli_parsing import configured_class
from lpt_lightning.errors import ConfigError


def set_aside_dir(folder: Path) -> Path:
    """Where `lpt fit --overwrite=true` keeps the earlier run's checkpoints of ``folder`` until the
    new run ends: a hidden sibling (inside, ModelCheckpoint would warn of a non-empty directory)."""
    return folder.parent / f".{folder.name}.lpt-overwritten"


class RunDirectoryGuards:
    """LightningCLI mixin: the run directory's earlier checkpoints, refused or set aside."""

    def _trainer_config(self) -> Namespace:
        subcommand = self.config.get("subcommand")
        return (self.config[subcommand] if subcommand else self.config).trainer

    def _checkpoint_dirs(self) -> list[Path]:
        """The configured ModelCheckpoints' directories, read from the config: known before anything is built."""
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks = self._trainer_config().get("callbacks") or []
        dirs = []
        for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
            cls = configured_class(callback)
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
