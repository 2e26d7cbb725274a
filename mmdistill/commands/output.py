"""Where commands write: rich tables and progress on stderr, one JSON document on stdout."""

from __future__ import annotations

import contextlib
import json
import os
import sys

import typer
from rich.console import Console
from rich.table import Table

from ..errors import GATES_FAILED
from ..gates import failed_summary

err = Console(stderr=True)
"""The console every command prints its tables, progress and messages to."""


def emit_json(document: dict) -> None:
    """Print the single JSON document of a ``--json`` run on stdout."""
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def stdout_to_stderr():
    """Send everything written to stdout (Python or native code) to stderr for a while, so that
    libraries that print (DeepSpeed does) cannot corrupt the ``--json`` document."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def gates_table(verdict: dict) -> Table:
    """The checks of a gates verdict (:func:`mmdistill.gates.check_gates`), one row each."""
    table = Table(title="quality gates: " + ("passed" if verdict["passed"] else "FAILED"))
    for column in ("gate", "value", "verdict"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for check in verdict["checks"]:
        value = "not measured" if check["value"] is None else f"{check['value']:.4g}"
        table.add_row(check["gate"], value, "pass" if check["passed"] else "[red]FAIL[/]")
    return table


def finish_report(report: dict, as_json: bool, failing: str) -> None:
    """End a command with its report: the gates table (if any), the ``--json`` document, and
    exit :data:`~mmdistill.errors.GATES_FAILED` when a gate failed, saying so with ``failing``
    (e.g. where the student failing them was written)."""
    verdict = report.get("gates")
    if verdict is not None:
        err.print(gates_table(verdict))
    if as_json:
        emit_json(report)
    if verdict is not None and not verdict["passed"]:
        err.print(f"[bold red]quality gates failed:[/] {failed_summary(verdict)}; {failing}")
        raise typer.Exit(GATES_FAILED)


def export_summary(verdict: dict) -> str:
    """One table cell of an :func:`~mmdistill.export.export_verdict`."""
    if verdict["exportable"]:
        return f"exportable to {verdict['architecture']} (mmdistill export; vLLM, SGLang)"
    return "not exportable: " + "; ".join(verdict["reasons"])
