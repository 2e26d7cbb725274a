"""User-facing errors. The CLI prints these as one clear message (no traceback) and exits with
the code given here; anything else is a bug and keeps its traceback."""

from __future__ import annotations


class MmdistillError(Exception):
    """Base class for mistakes a user can fix (bad input, missing files, unsupported models).

    ``completed`` says what was done before the failure (e.g. the last good checkpoint); the CLI
    puts it in the ``--json`` error document.
    """

    exit_code = 2

    def __init__(self, message: str = "", completed: dict | None = None):
        super().__init__(message)
        self.completed = dict(completed or {})


class TeacherError(MmdistillError):
    """The teacher cannot be found, read or converted."""


class CheckpointError(MmdistillError):
    """A checkpoint is missing, partial or unreadable."""


class RecipeError(MmdistillError):
    """A recipe is malformed; the message names the offending key."""


class DataError(MmdistillError):
    """Training or evaluation data is missing or malformed."""


class TrainingError(MmdistillError):
    """Training stopped (e.g. a non-finite loss); the last good checkpoint is kept."""

    exit_code = 3
