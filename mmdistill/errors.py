"""User-facing errors and the exit codes. The CLI prints these as one clear message (no
traceback) and a hint, and exits with the code given here; anything else is a bug and keeps its
traceback."""

from __future__ import annotations

GATES_FAILED = 4
"""Exit code of a run or an evaluation whose student failed a quality gate (:mod:`mmdistill.gates`)."""

EXIT_CODES = {
    0: "success",
    1: "unexpected error: a bug in mmdistill (the traceback is shown; please report it)",
    2: "bad input: command line, recipe, data, teacher, checkpoint or output folder; nothing "
    "half-written is left",
    3: "training stopped: non-finite loss or gradient; the last good checkpoint is kept",
    GATES_FAILED: "a quality check failed: a gate (the student is written, marked failing in "
    "gates.json) or export --check (the export is written); the report lists every check",
    5: "out of resources: disk full or out of memory; what was complete is kept",
    130: "interrupted (Ctrl-C); a run continues with --resume",
}
"""Every exit code of the ``mmdistill`` command (the README's table is this one)."""


class MmdistillError(Exception):
    """Base class for mistakes a user can fix (bad input, missing files, unsupported models).

    ``completed`` says what was done before the failure (e.g. the last good checkpoint) and
    ``hint`` what to do next (default: the class's); the CLI prints both, and puts them in the
    ``--json`` error document.
    """

    exit_code = 2
    default_hint = "fix what the message names and run the command again"

    def __init__(self, message: str = "", completed: dict | None = None, hint: str | None = None):
        super().__init__(message)
        self.completed = dict(completed or {})
        self.hint = hint or self.default_hint


class TeacherError(MmdistillError):
    """The teacher cannot be found, read or converted."""

    default_hint = (
        "give a local model directory, a .gguf file, a built-in teacher (builtin:tiny-hovle) "
        "or, online, a hub id; docs/adapters.md lists the supported families"
    )


class CheckpointError(MmdistillError):
    """A checkpoint is missing, partial or unreadable."""

    default_hint = "check the folder named above: --force replaces only what mmdistill wrote"


class RecipeError(MmdistillError):
    """A recipe is malformed; the message names the offending key."""

    default_hint = "'mmdistill validate RECIPE' checks a recipe without loading anything"


class DataError(MmdistillError):
    """Training or evaluation data is missing or malformed."""

    default_hint = "fix or remove the file or record named above (docs/distillation.md: data)"


class TrainingError(MmdistillError):
    """Training stopped (e.g. a non-finite loss); the last good checkpoint is kept."""

    exit_code = 3
    default_hint = "follow the advice above; 'mmdistill run RECIPE --resume' continues"


class ResourceError(MmdistillError):
    """The machine ran out of something (disk space, memory); not a mistake in the input."""

    exit_code = 5
    default_hint = "free space or memory (or use a larger machine) and run again with --resume"
