"""Errors that clat raises for bad input.

Every error a user can cause is a :class:`ClatError` whose message says what was
wrong and how to fix it; the CLI prints it in one or two lines and exits with a
non-zero code instead of showing a stack trace.
"""


class ClatError(Exception):
    """Base class of all user-facing clat errors."""


class ConfigError(ClatError):
    """A configuration value is unknown, malformed or out of range."""


class DataError(ClatError):
    """A data set folder or file is missing, malformed or fails verification."""


class CheckpointError(ClatError):
    """A checkpoint is missing, corrupted, or does not fit the model."""
