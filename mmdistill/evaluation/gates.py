"""A run's quality gates: its written student against its teacher on the recipe's held-out data.

:func:`check_run_gates` loads what the run wrote (the student that would ship, not the one in
memory) and a fresh copy of the teacher, evaluates them like ``mmdistill eval`` on
``gates.data`` (default ``data.eval``), checks ``gates.checks`` (:mod:`mmdistill.gates`), and
records the verdict in ``student/gates.json`` and ``report.json``. A failing student is kept,
marked ``"passed": false``; the caller decides the exit code (``mmdistill run``: 4).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..checkpoint import GATES_FILE
from ..data.loader import resolve_source_path, shapes_dataset
from ..files import atomic_write_text
from ..gates import check_gates, gate_metrics
from ..recipe import Recipe
from .models import load_model
from .runner import evaluate


def _gate_files(recipe: Recipe) -> list[Path]:
    """The files behind ``recipe.gate_data`` (the built-in shapes data is built if needed)."""
    sources = recipe.gate_data
    shapes = None
    if any(s.is_builtin for s in sources):
        shapes = shapes_dataset(recipe.data.shapes, recipe.data.cache_dir)
    return [resolve_source_path(s.source, shapes) for s in sources]


def check_run_gates(recipe: Recipe, report: dict[str, Any], device: str = "cpu") -> dict[str, Any]:
    """``report`` (from :func:`mmdistill.trainer.distill`) with ``"gates"`` and ``"status"``
    (``"ok"`` or ``"gates_failed"``) added; both are also written to disk.

    ``report["gates"]`` is ``{"passed", "checks": [{"gate", "metric", "op", "threshold",
    "value", "passed"}, ...], "metrics", "data", "seconds"}``. Without gates the report only
    gains ``"status": "ok"``.
    """
    gates = recipe.gates.parsed
    if not gates:
        return {**report, "status": "ok"}
    started = time.perf_counter()
    files = _gate_files(recipe)
    dtype = "float32" if device == "cpu" else recipe.resolved_teacher_dtype
    teacher = load_model(recipe.teacher, dtype=dtype, device=device)
    student = load_model(report["student_dir"], dtype=dtype, device=device)
    result = evaluate(
        student,
        teacher,
        files,
        max_tokens=recipe.gates.max_tokens,
        max_questions=recipe.gates.max_questions,
        seq_len=recipe.data.seq_len,
        batch_size=recipe.gates.batch_size,
        progress=True,
    )
    verdict = {
        **check_gates(gates, gate_metrics(result)),
        "data": [str(f) for f in files],
        "seconds": round(time.perf_counter() - started, 3),
    }
    atomic_write_text(Path(report["student_dir"]) / GATES_FILE, json.dumps(verdict, indent=2))
    status = "ok" if verdict["passed"] else "gates_failed"
    report = {**report, "gates": verdict, "status": status}
    atomic_write_text(Path(report["output_dir"]) / "report.json", json.dumps(report, indent=2))
    return report
