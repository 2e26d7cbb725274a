"""``mmdistill export``: a student as a stock transformers folder (``GraniteMoeHybridForCausalLM``)
that vLLM and SGLang serve; ``--check`` loads it with stock transformers and compares it with the
student (exit 4 on a mismatch: a CI gate). docs/export.md."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..errors import GATES_FAILED
from ..export import check_export, check_stock_transformers, export_student
from .options import DTYPE_HELP, check_dtype
from .output import emit_json, err


def export_command(
    student: Path = typer.Option(..., "--student", "-s", help="Student directory to export."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the export."),
    force: bool = typer.Option(
        False, "--force", help="Replace an earlier export in --out (not other files)."
    ),
    check: bool = typer.Option(
        False, "--check", help="Load the export with stock transformers and compare (exit 4)."
    ),
    dtype: str | None = typer.Option(None, help=f"{DTYPE_HELP} Default: the student's."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON report on stdout."),
) -> None:
    """Write a student as a stock transformers model (GraniteMoeHybrid) for vLLM and SGLang."""
    if dtype is not None:
        check_dtype(dtype)
    if check:
        check_stock_transformers()  # before writing: --check could not pass
    with err.status(f"writing {out}"):
        report = export_student(student, out, force=force, dtype=dtype)
    report["status"] = "ok"
    table = Table(title=f"exported: {out}", show_header=False)
    table.add_row("architecture", f"{report['architecture']} ({report['dtype']})")
    kinds = report["layer_types"]
    table.add_row(
        "layers", f"{kinds.count('attention')} attention + {kinds.count('mamba')} Mamba-2"
    )
    if check:
        with err.status("loading the export with stock transformers"):
            result = check_export(str(out), str(student))
        report["check"] = result
        report["status"] = "ok" if result["passed"] else "check_failed"
        table.add_row(
            "check",
            f"{'passed' if result['passed'] else 'FAILED'}: logits differ by "
            f"{result['relative_diff']:.2e} of their scale (<= {result['tolerance']:g}), greedy "
            f"tokens {'equal' if result['tokens_equal'] else 'DIFFER'} (transformers "
            f"{result['transformers']})",
        )
    err.print(table)
    if as_json:
        emit_json(report)
    if report["status"] == "check_failed":
        err.print(f"[bold red]export check failed[/]: {out} is written but differs from {student}")
        raise typer.Exit(GATES_FAILED)


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
