"""The trainer precisions the phases are proven under (tests/test_mixed_precision.py)."""
from __future__ import annotations

from typing import Any

from lpt_lightning.errors import ConfigError

SUPPORTED_PRECISIONS = ("32-true", "bf16-mixed")
# Lightning's shorthands, as the Trainer reads them.
_ALIASES = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "64": "64-true", "half": "16-true"}


def check_precision(precision: Any) -> str:
    """The unified name of a ``trainer.precision`` value; ConfigError unless it is supported.

    Under ``bf16-mixed`` the frozen backbone runs in bfloat16 and everything that decides a label
    or a gradient's size (cosine logits, losses, metrics, the scorer, W_base) stays float32.
    ``16-mixed`` (float16 with a GradScaler) is refused: the CPU has no float16 autocast (Lightning
    runs it as bf16-mixed there), so no test proves it.
    """
    value = _ALIASES.get(str(precision), str(precision))
    if value in SUPPORTED_PRECISIONS:
        return value
    if value == "16-mixed":
        raise ConfigError(
            f"trainer.precision={precision}: float16 mixed precision is not supported (it cannot be tested on the "
            "CPU, where Lightning runs it as bf16-mixed). Use bf16-mixed on GPUs with bfloat16 (A100, H100, "
            "RTX 30xx and later) or 32-true on older ones (V100, T4)")
    raise ConfigError(f"trainer.precision={precision}: not supported; use bf16-mixed (GPUs) or 32-true: the trained "
                      f"tensors, losses and metrics must stay float32")
