"""Project exceptions: each names the file, line or option at fault and says what to do."""


class LPTError(Exception):
    """Base class for every error this project raises on purpose."""


class DataFormatError(LPTError, ValueError):
    """An annotation file, image or dataset source is malformed or inconsistent."""


class ConfigError(LPTError, ValueError):
    """A configuration value is missing, inconsistent or impossible."""


class CheckpointError(LPTError, ValueError):
    """A checkpoint or weights file is unreadable, unsafe or does not match the model."""


class CacheError(LPTError, ValueError):
    """The expert-output cache of phase 3 is missing, incomplete, unreadable or stale."""


class RunInterrupted(Exception):
    """Ctrl-C or SIGTERM ended a run; the message says where and how to resume."""

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code
