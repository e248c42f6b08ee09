"""Exceptions a user can act on; the CLI prints their message without a traceback."""


class PolytaskError(Exception):
    """Base of every error polytask raises on purpose."""


class ConfigError(PolytaskError, ValueError):
    """A configuration key or value is wrong; the message names the key."""


class DataError(PolytaskError, ValueError):
    """Input data is malformed; the message names the file, column or task."""


class CheckpointError(PolytaskError):
    """A checkpoint or run directory cannot be read or does not match the run."""
