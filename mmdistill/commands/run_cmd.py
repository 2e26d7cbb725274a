"""``mmdistill run`` (teacher → seeded student → the recipe's stages) and ``mmdistill validate``.

Both take a recipe and OmegaConf-style ``key=value`` overrides; a malformed recipe fails before
anything is loaded, naming the key (exit 2). ``run --json`` prints one JSON report on stdout
(process 0 only); everything else goes to stderr. A non-finite loss or gradient exits 3. The
recipe's quality gates and ``--gate`` options are checked on held-out data once the student is
written (:mod:`mmdistill.evaluation.gates`); a failed gate exits 4, the student kept.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..checkpoint import read_student_config
from ..errors import MmdistillError, RecipeError
from ..evaluation.gates import check_run_gates
from ..export import export_verdict
from ..export.plan import planned_export
from ..recipe import load_recipe
from ..trainer import check_layout, distill
from .options import GATE_HELP, gate_options
from .output import emit_json, err, export_summary, finish_report, stdout_to_stderr

RECIPE_HELP = "Recipe YAML (see recipes/ and docs/distillation.md)."
OVERRIDES_HELP = (
    "Overrides as key=value with dotted paths, e.g. output_dir=runs/x stages.0.lr=1e-3."
)


def run_command(
    recipe: Path = typer.Argument(..., help=RECIPE_HELP),
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP),
    resume: bool = typer.Option(
        False, "--resume", help="Continue from the latest complete checkpoint in output_dir."
    ),
    gate: list[str] | None = typer.Option(None, "--gate", help=GATE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON report on stdout."),
) -> None:
    """Distil a teacher into a Mamba-2 / hybrid student with the recipe's stages."""
    gate_options(gate)
    loaded = load_recipe(recipe, overrides or []).with_gates(gate or [])
    with stdout_to_stderr():
        report = distill(loaded, resume=resume, console=err)
    from accelerate import PartialState

    state = PartialState()
    if not state.is_main_process:
        return
    print_run_table(report)
    report["export"] = export_verdict(read_student_config(Path(report["student_dir"])))
    with stdout_to_stderr():
        report = check_run_gates(loaded, report, device=str(state.device))
    finish_report(report, as_json, f"the student is written to {report['student_dir']}")


def print_run_table(report: dict) -> None:
    """The stages of a run's report as a table on stderr."""
    table = Table(
        title=f"distilled student: {report['student_dir']}",
        caption="loss: first / last step, and on the eval data",
    )
    table.add_column("stage", overflow="fold")  # wraps, never cut, at 80 columns
    table.add_column("mode", overflow="fold")
    for column in ("steps", "tokens", "first", "last", "eval"):
        table.add_column(column, justify="right")
    for stage in report["stages"]:
        table.add_row(
            stage["name"],
            stage["mode"],
            str(stage["steps"]),
            f"{stage['tokens']:,}",
            f"{stage['initial_loss']:.4g}",
            f"{stage['final_loss']:.4g}",
            "-" if stage["eval_loss"] is None else f"{stage['eval_loss']:.4g}",
        )
    err.print(table)


def _mode(stage) -> str:
    if stage.task == "both":
        return f"tasks mmu:t2i = {stage.task_ratio.mmu}:{stage.task_ratio.t2i}"
    if stage.tasks:
        return f"task {stage.task}"
    return "layer-wise" if stage.loss.layerwise else "end-to-end"


def validate_command(
    recipe: Path = typer.Argument(..., help=RECIPE_HELP),
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP),
    as_json: bool = typer.Option(
        False, "--json", help="Print the validated recipe (defaults filled in) as JSON."
    ),
) -> None:
    """Check a recipe without loading anything; missing data files are reported as warnings."""
    loaded = load_recipe(recipe, overrides or [])
    if _reads_teacher_config(loaded):
        try:  # layer indices and auto budgets against the teacher's config
            check_layout(loaded)
        except RecipeError as exc:
            raise RecipeError(str(exc), hint="fix the key named above and validate again") from exc
    table = Table(title=f"{recipe}: valid", show_header=False)
    if loaded.student_dir is not None:
        table.add_row("student", f"from {loaded.student_dir}")
    else:
        table.add_row("teacher", loaded.teacher)
        table.add_row("student", f"attention layers: {loaded.student.attention_layers}")
    if loaded.omni is not None:
        t2i = ", ".join(s.source for s in loaded.omni.t2i)
        table.add_row("omni", f"{loaded.omni.image_tokenizer}; {loaded.omni.vocabulary}; t2i {t2i}")
    sources = ", ".join(f"{s.source} (x{s.weight:g})" for s in loaded.data.train)
    table.add_row("data", f"{sources}; seq_len {loaded.data.seq_len}")
    for i, stage in enumerate(loaded.stages):
        length = f"{stage.steps} steps" if stage.steps is not None else f"{stage.tokens:,} tokens"
        mode = _mode(stage)
        table.add_row(
            f"stage {i}",
            f"{stage.name}: {mode}, trains {', '.join(stage.trainable)}, lr {stage.lr:g}, {length}",
        )
    table.add_row("distributed", loaded.distributed.deepspeed or "plain PyTorch (DDP)")
    if loaded.gates.checks:
        on = ", ".join(s.source for s in loaded.gate_data)
        table.add_row("gates", f"{', '.join(loaded.gates.checks)} on {on}")
    table.add_row("export", _planned_export(loaded))
    table.add_row("output_dir", loaded.output_dir)
    err.print(table)
    for problem in loaded.missing_files():
        err.print(f"[yellow]warning:[/] {problem}", highlight=False)
    if as_json:
        emit_json(loaded.model_dump(mode="json"))


def _reads_teacher_config(recipe) -> bool:
    """Whether the teacher's config.json is here to read (built-in or a local path)."""
    teacher = recipe.teacher or ""
    return recipe.student_dir is None and (teacher.startswith("builtin:") or Path(teacher).exists())


def _planned_export(recipe) -> str:
    """Whether the recipe's student will export, or why that is not known yet."""
    if recipe.student_dir is None and not _reads_teacher_config(recipe):
        return "checked when the teacher loads (not a local folder)"
    try:
        return export_summary(planned_export(recipe))
    except MmdistillError as exc:
        return f"not known yet ({exc})"


def register(app: typer.Typer) -> None:
    app.command("run")(run_command)
    app.command("validate")(validate_command)
