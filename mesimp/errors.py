"""Error types that the CLI turns into one-line messages and exit codes.

Library code raises these instead of printing, so a Python user gets a normal
exception and a shell user gets ``error: <message>`` with a stable exit code:
2 for bad input or usage (click's convention), 1 for a runtime failure.
"""

from __future__ import annotations


class MesimpError(Exception):
    """Base class; ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class BadInputError(MesimpError, ValueError):
    """The user's input (a file, an option, a shape) cannot be used."""

    exit_code = 2


class DataError(BadInputError):
    """A data file is missing or malformed."""


class CheckpointError(BadInputError):
    """A file is not a usable mesimp checkpoint."""


class VerificationError(MesimpError):
    """A self-check failed (shrink or export parity): the result is not trustworthy."""
