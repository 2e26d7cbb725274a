"""Options several commands share: input files, weight dtype and device, checked before anything
loads."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
import typer

from ..errors import DataError, MmdistillError
from ..gates import METRICS, Gate, parse_gates

DTYPES = ("float32", "bfloat16", "float16")
DTYPE_HELP = f"Weights dtype: {' | '.join(DTYPES)}."
DEVICE_HELP = "cpu, cuda, cuda:1, ..."
GATE_HELP = (
    "Quality gate METRIC OP NUMBER, e.g. 'kl<=0.15' (repeatable; exit 4 when one fails). "
    f"Metrics: {', '.join(METRICS)}."
)


def gate_options(texts: Iterable[str] | None) -> list[Gate]:
    """The ``--gate`` options parsed; a usage error (exit 2) names a bad one."""
    try:
        return parse_gates(texts or [])
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--gate") from None


def require_files(paths: Iterable[Path], what: str) -> None:
    """A user error (exit 2) naming the first of ``paths`` that is not a file (``what`` file not
    found: PATH)."""
    for path in paths:
        if not path.is_file():
            raise DataError(f"{what} file not found: {path}")


def check_dtype(dtype: str) -> str:
    """``dtype`` if it is one of :data:`DTYPES`; a usage error (exit 2) naming them otherwise."""
    if dtype not in DTYPES:
        raise typer.BadParameter(
            f"unknown dtype {dtype!r}; one of {', '.join(DTYPES)}", param_hint="--dtype"
        )
    return dtype


def resolve_device(text: str) -> torch.device:
    """The device ``text`` names (``auto``: CUDA when available, else the CPU), if it exists here.

    Raises:
        MmdistillError: for a name torch does not parse, CUDA on a machine without it (a CPU-only
            torch build included), or a GPU index past the ones present.
    """
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise MmdistillError(f"unknown device {text!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MmdistillError(
                f"--device {text}: CUDA is not available here (torch {torch.__version__}); "
                "use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MmdistillError(
                f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type != "cpu":
        raise MmdistillError(f"unsupported device {text!r}; use cpu, cuda or cuda:N")
    return device
