"""``mmdistill eval``: a student against its teacher on text and multimodal data.

Perplexity of both, KL(teacher ‖ student) per token, top-1 agreement, and answer accuracy on
question/answer conversations (definitions: :mod:`mmdistill.evaluation`, docs/evaluation.md).
Optionally lm-evaluation-harness tasks. A table goes to stderr; ``--json`` prints one document.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from ..errors import DataError
from ..evaluation import (
    evaluate_many,
    lm_eval_available,
    load_model,
    run_lm_eval,
    tokenizer_for,
)
from ..model import DecoderLM
from .options import DEVICE_HELP, DTYPE_HELP, check_dtype, require_files, resolve_device
from .output import emit_json, err


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def _accuracy_cell(acc: dict | None) -> str:
    if not acc:
        return "-"
    return f"{acc['teacher']:.0%} / {acc['student']:.0%} ({acc['questions']})"


def results_table(result: dict, title: str = "student vs teacher") -> Table:
    """A rich table of an :func:`mmdistill.evaluation.evaluate` result (one row per file)."""
    table = Table(title=title)
    for name in ("data", "tokens", "teacher ppl", "student ppl", "KL", "top-1"):
        table.add_column(name, justify="left" if name == "data" else "right")
    table.add_column("answers T / S (n)", justify="right")
    rows = [(Path(f["path"]).name, f) for f in result["files"]]
    if len(rows) > 1:
        rows.append(("all", result))
    for name, r in rows:
        table.add_row(
            name,
            f"{r['tokens']:,}",
            _fmt(r["teacher_ppl"]),
            _fmt(r["student_ppl"]),
            _fmt(r["kl"]),
            _fmt(r["top1_agreement"]),
            _accuracy_cell(r.get("answer_accuracy")),
            style="bold" if name == "all" else None,
        )
    return table


def _harness(
    teacher: DecoderLM,
    student: DecoderLM,
    tasks: list[str],
    limit: int | None,
    include_path: Path | None,
) -> dict[str, Any]:
    """lm-evaluation-harness results of both models (a table on stderr): ``{"teacher", "student"}``."""
    tokenizer = tokenizer_for(teacher)
    results = {}
    for name, model in (("teacher", teacher), ("student", student)):
        with err.status(f"lm-eval {','.join(tasks)} on the {name}"):
            results[name] = run_lm_eval(
                model, tokenizer, tasks, limit=limit, include_path=include_path
            )
    table = Table(title="lm-evaluation-harness")
    for col in ("task", "metric", "teacher", "student"):
        table.add_column(col)
    for task, metrics in results["student"].items():
        for metric, value in metrics.items():
            if isinstance(value, int | float) and "stderr" not in metric:
                other = results["teacher"].get(task, {}).get(metric)
                table.add_row(task, metric, _fmt(other), _fmt(value))
    err.print(table)
    return results


def eval_command(
    student: str = typer.Option(
        ..., "--student", "-s", help="Student directory (or any teacher source, to compare)."
    ),
    teacher: str = typer.Option(
        ..., "--teacher", "-t", help="Alias (hovle), model directory, .gguf file or hub id."
    ),
    data: list[Path] = typer.Option(
        None, "--data", "-d", help="Data file (.txt or .jsonl); repeat, or list several after it."
    ),
    more_data: list[Path] = typer.Argument(None, help="More data files.", show_default=False),
    max_tokens: int | None = typer.Option(
        None, "--max-tokens", min=1, help="Score at most N tokens of each file."
    ),
    seq_len: int = typer.Option(512, "--seq-len", min=2, help="Window length for documents."),
    batch: int = typer.Option(1, "--batch", "-b", min=1, help="Sequences per forward."),
    max_questions: int | None = typer.Option(
        None, "--max-questions", min=0, help="Answer at most N questions of each file."
    ),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", min=1, help="Answer length limit."),
    no_template: bool = typer.Option(
        False, "--no-template", help="Render conversations as plain text, not the chat template."
    ),
    tasks: str | None = typer.Option(
        None, "--tasks", help="Comma-separated lm-evaluation-harness tasks (needs lm-eval)."
    ),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Examples per --tasks task."),
    include_path: Path | None = typer.Option(
        None, "--include-path", help="Directory of extra lm-eval task YAMLs (local data)."
    ),
    dtype: str = typer.Option("float32", help=DTYPE_HELP),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Perplexity, KL(teacher‖student), top-1 agreement and answer accuracy of a student."""
    files = [*(data or []), *(more_data or [])]
    task_list = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    if not files and not task_list:
        raise DataError("give data files (--data FILE...) or lm-eval --tasks")
    if task_list and not lm_eval_available():
        raise DataError(
            "--tasks needs lm-evaluation-harness, which is not installed: pip install lm-eval "
            "(its task data must then be available offline, in the local datasets cache)"
        )
    require_files(files, "data")
    check_dtype(dtype)
    device = str(resolve_device(device))
    with err.status(f"loading teacher {teacher}"):
        teacher_model = load_model(teacher, dtype=dtype, device=device)
    with err.status(f"loading student {student}"):
        student_model = load_model(student, dtype=dtype, device=device)
    report: dict[str, Any] = {"teacher_source": teacher, "student_source": student}
    if files:
        result = evaluate_many(
            {"student": student_model},
            teacher_model,
            files,
            max_tokens=max_tokens,
            seq_len=seq_len,
            batch_size=batch,
            max_questions=max_questions,
            max_new_tokens=max_new_tokens,
            use_template=not no_template,
            progress=True,
        )["student"]
        report.update(result)
        err.print(results_table(result, f"{student} vs {teacher}"))
    if task_list:
        report["lm_eval"] = _harness(teacher_model, student_model, task_list, limit, include_path)
    if as_json:
        emit_json(report)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
