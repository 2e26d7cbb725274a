"""``mmdistill eval``: a student against its teacher on text and multimodal data.

Perplexity of both, KL(teacher ‖ student) per token, top-1 agreement, and answer accuracy on
question/answer conversations (definitions: :mod:`mmdistill.evaluation`, docs/evaluation.md).
Optionally lm-evaluation-harness tasks. A table goes to stderr; ``--json`` prints one document.

``--task t2i`` evaluates generation instead (no teacher): one image per caption of each
``--data`` caption file (``{"image", "caption"}`` JSONL of the shapes world), read back by the
shapes checker: exact match and per-attribute accuracy (:mod:`mmdistill.t2i_evaluation`).

``--gate 'kl<=0.15'`` (repeatable) checks the overall metrics against thresholds
(:mod:`mmdistill.gates`); a failed gate exits 4 after the report is printed.
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
from ..gates import check_gates, gate_metrics
from ..model import DecoderLM
from ..t2i_evaluation import evaluate_t2i, load_t2i_student, save_png
from ..t2i_generation import Sampling
from .options import (
    DEVICE_HELP,
    DTYPE_HELP,
    GATE_HELP,
    check_dtype,
    gate_options,
    require_files,
    resolve_device,
)
from .output import emit_json, err, finish_report


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


def t2i_table(name: str, result: dict) -> Table:
    """One row of text-to-image scores."""
    table = Table(title=f"text-to-image: {name}")
    for column in ("captions", "exact", "colour", "shape", "size", "position"):
        table.add_column(column, justify="right")
    attrs = result["attribute_accuracy"]
    cells = [f"{attrs[k]:.1%}" for k in ("colour", "shape", "size", "position")]
    table.add_row(str(result["n"]), f"{result['exact_match']:.1%}", *cells)
    return table


def eval_t2i(
    student: str, files: list[Path], sampling: Sampling, save_images: Path | None, device: str
) -> dict:
    """Score the student's images for each caption file (tables on stderr); the report."""
    with err.status(f"loading student {student}"):
        model = load_t2i_student(student, device=device)
    report: dict[str, Any] = {"status": "ok", "student_source": student, "task": "t2i", "files": []}
    for path in files:
        with err.status(f"drawing the captions of {path}"):
            result, images, _ = evaluate_t2i(model, path, sampling)
        report["files"].append({"path": str(path), **result})
        err.print(t2i_table(path.name, result))
        for i, image in enumerate(images if save_images is not None else []):
            save_png(image, save_images / f"{path.stem}_{i:04d}.png")
    return report


def eval_command(
    student: str = typer.Option(
        ..., "--student", "-s", help="Student directory (or any teacher source, to compare)."
    ),
    teacher: str | None = typer.Option(
        None, "--teacher", "-t", help="Alias (hovle), model directory, .gguf file or hub id."
    ),
    task: str = typer.Option(
        "mmu", "--task", help="mmu (against the teacher) or t2i (caption files, no teacher)."
    ),
    cfg_scale: float = typer.Option(
        0.0, "--cfg-scale", min=0.0, help="--task t2i: classifier-free guidance (0 = none)."
    ),
    save_images: Path | None = typer.Option(
        None, "--save-images", help="--task t2i: write the generated images to this directory."
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
    gate: list[str] | None = typer.Option(None, "--gate", help=GATE_HELP),
    eager: bool = typer.Option(
        False, "--eager", help="Decode on the eager reference path (no captured CUDA graph)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Perplexity, KL(teacher‖student), top-1 agreement and answer accuracy of a student."""
    files = [*(data or []), *(more_data or [])]
    gates = gate_options(gate)
    if task not in ("mmu", "t2i"):
        raise typer.BadParameter(f"unknown task {task!r}; mmu or t2i", param_hint="--task")
    if gates and (task == "t2i" or not files):
        raise typer.BadParameter(
            "gates check the metrics of --data files against the teacher (--task mmu)",
            param_hint="--gate",
        )
    if task == "t2i":
        if not files:
            raise DataError("--task t2i: give caption files (--data captions.jsonl)")
        require_files(files, "data")
        sampling = Sampling(cfg_scale=cfg_scale, decode="eager" if eager else "auto")
        report = eval_t2i(student, files, sampling, save_images, str(resolve_device(device)))
        if as_json:
            emit_json(report)
        return
    if teacher is None:
        raise typer.BadParameter("give the teacher to compare with", param_hint="--teacher")
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
    report: dict[str, Any] = {
        "status": "ok",
        "teacher_source": teacher,
        "student_source": student,
    }
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
            decode="eager" if eager else "auto",
        )["student"]
        report.update(result)
        err.print(results_table(result, f"{student} vs {teacher}"))
    if task_list:
        report["lm_eval"] = _harness(teacher_model, student_model, task_list, limit, include_path)
    if gates:
        report["gates"] = check_gates(gates, gate_metrics(report))
        report["status"] = "ok" if report["gates"]["passed"] else "gates_failed"
    finish_report(report, as_json, f"the student {student} does not pass them")


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
