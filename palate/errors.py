"""Exceptions with messages meant for people.

Every error raised for bad input is a :class:`PalateError`: the CLI prints its message on one
line (no traceback) and exits non-zero. Messages name the file, line and field at fault and,
where one exists, the command that fixes it.
"""

from __future__ import annotations


class PalateError(Exception):
    """Base class: an error caused by input or environment, with a human-readable message."""


class ConfigError(PalateError):
    """A config file or ``--set`` override is invalid (unknown key, wrong type, bad value)."""


class DataError(PalateError):
    """A data file is missing, unreadable, or has invalid rows."""


class ModelLoadError(PalateError):
    """A model spec cannot be resolved or loaded."""


class ConflictError(PalateError):
    """A request lost a race or repeats one that already took effect (HTTP 409): labelling an
    assignment that is already labelled, skipped or expired."""
