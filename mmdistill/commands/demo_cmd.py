"""``mmdistill demo``: the embedded end-to-end demo (offline, CPU, minutes)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..demo.omni import run_omni_demo
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
    omni: bool = typer.Option(
        False, "--omni", help="Teach the distilled linear student to draw (OmniMamba stages)."
    ),
) -> None:
    """Seed, distil (3 stages) and evaluate hybrid and linear students of the shapes teacher;
    with --omni, then teach the linear student text-to-image generation."""
    if omni:
        omni_demo(output_dir, overrides or [], questions, as_json)
        return
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


def omni_demo(output_dir: Path, overrides: list[str], questions: int, as_json: bool) -> None:
    """The OmniMamba demo: its table on stderr, the report with ``--json``."""
    with stdout_to_stderr():
        report = run_omni_demo(output_dir, overrides, questions, console=err)
    attrs = report["t2i_attribute_accuracy"]
    table = Table(title=f"OmniMamba demo ({report['seconds']:.0f} s)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [
        (
            f"t2i exact match, {report['t2i_heldout_captions']} held-out captions",
            report["t2i_accuracy"],
        ),
        *((f"  {name}", value) for name, value in attrs.items()),
        ("t2i exact match, training captions", report["t2i_train_accuracy"]),
        ("mmu answer accuracy before", report["mmu_accuracy_before"]),
        ("mmu answer accuracy after", report["mmu_accuracy_after"]),
    ]
    for name, value in rows:
        table.add_row(name, f"{value:.3f}")
    err.print(table)
    err.print(f"example images: {Path(report['student_dir']).parent / 'heldout.png'}")
    if as_json:
        emit_json(report)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
