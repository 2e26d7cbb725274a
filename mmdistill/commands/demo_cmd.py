"""``mmdistill demo``: the embedded end-to-end demo (offline, CPU, minutes)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..demo.pipeline import run_demo
from .output import emit_json, err, stdout_to_stderr


def demo_command(
    output_dir: Path = typer.Option(
        Path("runs/demo"), "--output-dir", "-o", help="Where the runs and demo.json go."
    ),
    overrides: list[str] | None = typer.Argument(
        None, help="Recipe overrides for both runs, e.g. stages.2.steps=200."
    ),
    questions: int = typer.Option(240, help="Held-out questions asked of every model."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON document."),
) -> None:
    """Seed, distil (3 stages) and evaluate hybrid and linear students of the shapes teacher."""
    with stdout_to_stderr():
        report = run_demo(output_dir, overrides or [], questions, console=err)
    table = Table(title=f"held-out shapes QA ({report['questions']} questions)")
    for column in (
        "model",
        "answer accuracy",
        "vs teacher",
        "perplexity",
        "KL(T‖S)/token",
        "top-1 agree",
    ):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in report["rows"]:
        table.add_row(
            row["model"],
            f"{row['accuracy']:.3f}",
            f"{row['accuracy_vs_teacher']:.0%}",
            f"{row['ppl']:.3f}",
            f"{row['kl']:.4f}",
            f"{row['top1_agreement']:.3f}",
        )
    err.print(table)
    t = report["timings_s"]
    err.print(
        f"time: teacher {t['teacher']:.0f} s, hybrid {t['distill_hybrid']:.0f} s, linear "
        f"{t['distill_linear']:.0f} s, evaluation {t['evaluate']:.0f} s, total {t['total']:.0f} s"
    )
    if as_json:
        emit_json(report)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
