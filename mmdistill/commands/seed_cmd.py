"""``mmdistill seed``: teacher → seeded student checkpoint."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.table import Table

from ..attention_layers import auto_budget, is_auto
from ..checkpoint import check_replaceable
from ..errors import CheckpointError, DataError, RecipeError
from ..evaluation import tokenizer_for
from ..evaluation.layout import seed_by_measurement
from ..export import export_verdict
from ..seeding import count_parameters
from ..seeding import seed as seed_fn
from ..teachers import load_teacher
from ..teachers.verify import verification_summary
from .output import emit_json, err, export_summary


def seed_command(
    teacher: str = typer.Option(
        ..., "--teacher", "-t", help="Alias (hovle), model directory, .gguf file or hub id."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Directory for the student checkpoint."),
    attention_layers: str = typer.Option(
        "none",
        "--attention-layers",
        "-a",
        help="Layers that keep attention: none | all | every:K | auto:K | auto:P% | comma list "
        "(indices over the whole decoder stack; auto needs --data).",
    ),
    data: list[Path] = typer.Option(
        [], "--data", "-d", help="auto:K only: calibration .txt/.jsonl files to score layers on."
    ),
    dtype: str = typer.Option("float32", help="Weights dtype: float32 | bfloat16 | float16."),
    conv_kernel: int = typer.Option(2, help="Mixer causal conv width (mmMamba: 2)."),
    gate_order: str = typer.Option(
        "before_norm", help="before_norm (standard Mamba-2, exportable) or after_norm (mmMamba)."
    ),
    seed: int = typer.Option(0, help="RNG seed for the new SSM parameters."),
    force: bool = typer.Option(
        False, "--force", help="Replace a student in --out (not a folder with other files)."
    ),
    verify: bool = typer.Option(
        True,
        "--verify/--no-verify",
        help="Check the conversion against transformers' own forward first.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON report on stdout."),
) -> None:
    """Build a Mamba-2 / hybrid student from a teacher's attention weights (mmMamba seeding)."""
    if dtype not in ("float32", "bfloat16", "float16"):
        raise typer.BadParameter(f"unknown dtype {dtype!r}", param_hint="--dtype")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file; give a directory for the student")
    if out.exists() and any(out.iterdir()) and not force:
        raise CheckpointError(f"{out} exists and is not empty (use --force to overwrite)")
    if force:
        check_replaceable(out)
    start = time.perf_counter()
    with err.status(f"loading teacher {teacher}"):
        model = load_teacher(teacher, dtype=dtype, verify=verify)
    mixer = {"conv_kernel": conv_kernel, "gate_order": gate_order}
    auto = is_auto(attention_layers)
    try:
        auto_budget(attention_layers, model.config.num_layers)
    except ValueError as exc:
        raise RecipeError(f"--attention-layers: {exc}") from exc
    if auto and not data:
        raise DataError(f"--attention-layers {attention_layers} scores the layers: give --data")
    with err.status("scoring layers" if auto else "seeding mixers"):
        if auto:
            student = seed_by_measurement(
                model, attention_layers, data, tokenizer_for(model), mixer, seed
            )
        else:
            student = seed_fn(model, attention_layers=attention_layers, seed=seed, mixer=mixer)
    with err.status(f"writing {out}"):
        student.save_pretrained(out, overwrite=force)
    seconds = time.perf_counter() - start
    kept = [i for i, t in enumerate(student.config.layer_types) if t == "attention"]
    converted = student.mixer_layers()
    params = count_parameters(student)
    report = {
        "student_dir": str(out),
        "teacher": teacher,
        "adapter": student.config.teacher.get("adapter"),
        "verified": student.config.teacher.get("verified"),
        "layers": student.config.num_layers,
        "converted_layers": converted,
        "attention_layers": kept,
        "parameters": params,
        "export": export_verdict(student.config),
        "seconds": round(seconds, 3),
    }
    table = Table(title="seeded student", show_header=False)
    table.add_row("teacher", f"{teacher} ({report['adapter']})")
    table.add_row("verified", verification_summary(report["verified"]))
    table.add_row(
        "layers",
        f"{len(converted)} converted to Mamba-2, {len(kept)} attention kept {kept if len(kept) < 17 else ''}",
    )
    table.add_row(
        "parameters",
        f"{params['total']:,} total: {params['inherited']:,} inherited, {params['new']:,} new",
    )
    table.add_row("export", export_summary(report["export"]))
    table.add_row("written", str(out))
    table.add_row("time", f"{seconds:.1f} s")
    err.print(table)
    if as_json:
        emit_json(report)


def register(app: typer.Typer) -> None:
    app.command("seed")(seed_command)
