"""Exceptions a user can act on; the CLI prints their message without a traceback."""


class PolytaskError(Exception):
    """Base of every error polytask raises on purpose."""


class ConfigError(PolytaskError, ValueError):
    """A configuration key or value is wrong; the message names the key."""


class DataError(PolytaskError, ValueError):
    """Input data is malformed; the message names the file, column or task."""


class CheckpointError(PolytaskError):
    """A checkpoint or run directory cannot be read or does not match the run."""


class RunLockedError(CheckpointError):
    """Another live process holds the run directory; the message names its pid and the lock file."""


class DivergenceError(PolytaskError, ArithmeticError):
    """Training produced a non-finite loss; the message names the job, task and epoch."""


class StorageError(PolytaskError, OSError):
    """A file could not be written (disk full, no permission); the message names the file.

    An ``OSError`` too, so callers that handle OS errors keep working; ``errno`` and ``filename`` are kept."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else super().__str__()
