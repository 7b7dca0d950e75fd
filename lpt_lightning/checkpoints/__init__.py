"""Phase checkpoints: what they hold and how they are read, written and turned back into models.

Phase checkpoints hold only what was trained plus what is needed to rebuild the model: the
frozen backbones are rebuilt from their hub name or local file (recorded in the ``lpt``
metadata), so a checkpoint is a few MB instead of hundreds.

- `files`: safe loading, atomic writes, the safetensors export, the trainer's CheckpointIO;
- `metadata`: the ``lpt`` metadata schema and its checks (phase, class count, data);
- `experts`: trained experts rebuilt from a checkpoint.
"""
from lpt_lightning.checkpoints.experts import (
    expert_from_checkpoint,
    expert_spec_from_dict,
)
from lpt_lightning.checkpoints.files import (
    AtomicCheckpointIO,
    atomic_save,
    export_safetensors,
    load_checkpoint_file,
)
from lpt_lightning.checkpoints.metadata import (
    META_KEY,
    PHASE_NUMBERS,
    check_phase_metadata,
    check_same_data,
    is_saved_key,
    read_phase_metadata,
)

__all__ = [
    "META_KEY", "PHASE_NUMBERS", "AtomicCheckpointIO", "atomic_save", "check_phase_metadata", "check_same_data",
    "expert_from_checkpoint", "expert_spec_from_dict", "export_safetensors", "is_saved_key", "load_checkpoint_file",
    "read_phase_metadata",
]
