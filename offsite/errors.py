"""Exceptions with messages meant for the person at the terminal.

Every error that a user can cause (bad file, wrong bundle, spent budget) is an
``OffsiteError``; the CLI prints its message without a traceback.
"""

from __future__ import annotations


class OffsiteError(Exception):
    """Base class: a problem the user can fix, with a message that says how."""


class UnsupportedArchitectureError(OffsiteError):
    pass


class FormatError(OffsiteError):
    """A bundle, adapter, receipt or data file is malformed or fails verification."""


class IntegrityError(FormatError):
    """A file's hash does not match what its manifest says: refuse before loading."""


class MismatchError(OffsiteError):
    """An artifact belongs to a different bundle or model."""


class DataError(OffsiteError):
    """A training or evaluation data file is unusable; the message names file and line."""


class BudgetError(OffsiteError):
    """A privacy budget is spent or cannot be met."""
