"""The distillation recipe: teacher → seeded student → the recipe's stages → student checkpoint.

:func:`distill` runs a validated :class:`~mmdistill.recipe.Recipe` end to end:

1. checks the recipe's files, DeepSpeed and the output directory (before the teacher is loaded);
2. loads the teacher (frozen) and seeds the student (float32 master weights), or loads the
   recipe's ``student_dir`` (no teacher), or restores the student from the latest complete
   checkpoint with ``resume=True`` (:mod:`~mmdistill.training.resume`);
3. runs each stage in order, each starting from the previous stage's weights: trainable groups,
   AdamW and its schedule (:mod:`~mmdistill.training.stage_setup`,
   :mod:`~mmdistill.training.schedule`), then the loop (:mod:`~mmdistill.training.loop`), then a
   checkpoint (:mod:`~mmdistill.training.checkpoints`); before the first OmniMamba task stage
   the student gains its image vocabulary and task adapters (:mod:`~mmdistill.training.omni_data`);
4. writes the student with :func:`~mmdistill.checkpoint.save_pretrained` to
   ``output_dir/student`` and returns a report (one entry per stage).

Processes. Under ``accelerate launch`` every process runs this code; plain PyTorch uses DDP and
``distributed.deepspeed`` a DeepSpeed engine per stage (:mod:`~mmdistill.training.deepspeed_engine`).

Outputs: ``metrics.jsonl`` (one line per optimiser step), ``tensorboard/``, ``recipe.yaml`` (the
resolved recipe), ``checkpoints/``, ``report.json`` and ``student/``.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict

import torch
from rich.console import Console

from .attention_layers import auto_budget, is_auto, parse_attention_layers
from .data.loader import shapes_dataset
from .data.text import DataContext
from .errors import DataError, MmdistillError, RecipeError
from .files import atomic_write_text
from .model import DecoderLM, load_student
from .objective import TeacherForward
from .recipe import Recipe
from .seeding import seed
from .teachers import load_teacher, teacher_config
from .training.checkpoints import CHECKPOINTS, remove_partial_checkpoints, save_checkpoint
from .training.deepspeed_engine import wrap_teacher, zero_stage
from .training.layout import choose_layout, layout_due
from .training.loop import run_stage
from .training.metrics import MetricsLog
from .training.omni_data import image_tokenizer_for, load_omni_data, prepare_student
from .training.processes import Processes
from .training.resume import find_resume_point, resume_run, resume_stage
from .training.stage_setup import build_stage, finish_stage
from .training.state import Run


def distill(
    recipe: Recipe,
    resume: bool = False,
    callbacks: list[Callable[[dict], None]] | None = None,
    console: Console | None = None,
) -> dict:
    """Run ``recipe`` (see the module docstring) and return the report.

    Args:
        recipe: A validated recipe.
        resume: Continue from the latest complete checkpoint in ``output_dir``.
        callbacks: Called after every optimiser step (and its checkpoint, if any) with that
            step's metrics record, in every process.
        console: Rich console for progress (default: stderr).

    Returns:
        ``{"student_dir", "output_dir", "teacher", "processes", "deepspeed", "seconds",
        "stages": [{"name", "mode", "trainable", "trainable_parameters", "initial_loss",
        "final_loss", "final_parts", "steps", "tokens", "seconds", "tokens_per_second",
        "eval_loss", "skipped"}, ...]}``.

    Raises:
        MmdistillError: a user error (recipe, data, checkpoint) or a non-finite loss
            (:class:`~mmdistill.errors.TrainingError`).
    """
    problems = recipe.missing_files()
    if problems:
        raise DataError("; ".join(problems))
    check_layout(recipe)
    zero = zero_stage(recipe)
    procs = Processes.start()
    if console is None:
        console = Console(stderr=True)
    metrics = MetricsLog(recipe.output_dir, enabled=procs.is_main)
    run = Run(recipe, procs, console, metrics, list(callbacks or []), zero=zero)
    point = find_resume_point(run, resume)
    torch.manual_seed(recipe.seed)
    started = time.perf_counter()
    if procs.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
        remove_partial_checkpoints(run.out / CHECKPOINTS)
        atomic_write_text(run.out / "recipe.yaml", recipe.to_yaml())
    with console.status("loading the models") if procs.is_main else contextlib.nullcontext():
        teacher, student = _load_models(recipe, procs.device)
    run.data, run.shapes = _data_context(recipe, teacher or student, procs)
    if point is not None:
        student = resume_run(run, point, student)
    metrics.open_tensorboard(run.log)
    runner = TeacherForward(teacher) if teacher is not None else None
    if run.deepspeed and runner is not None:
        runner = wrap_teacher(runner, recipe, zero, procs.world)
    try:
        for index in range(point.first_stage if point else 0, len(recipe.stages)):
            if layout_due(run, student, index):
                student = choose_layout(run, teacher, student, index)
            if recipe.stages[index].tasks:
                run.omni = run.omni or load_omni_data(run)
                student = prepare_student(run, student)
            stage = build_stage(run, index, student)
            if point is not None:
                resume_stage(stage, point, procs.rank)
            run_stage(run, stage, runner)
            student = finish_stage(run, stage)
            report = stage.report
            save_checkpoint(run, index, report.steps, student, finished=asdict(report))
            run.log(
                f"stage {report.name}: loss {report.initial_loss:.5g} -> "
                f"{report.final_loss:.5g} in {report.steps} steps, "
                f"{report.tokens:,} tokens, {report.seconds:.1f} s"
            )
        if layout_due(run, student, None):
            student = choose_layout(run, teacher, student, None)
    except MmdistillError as exc:  # e.g. a full disk: say what is done
        exc.completed = exc.completed or run.completed()
        raise
    finally:
        metrics.close()
    return _write_student(run, student, started)


def check_layout(recipe: Recipe) -> None:
    """The recipe's attention layers against the teacher's layer count, from its config alone,
    before anything loads or is written.

    Raises:
        RecipeError: an index outside the teacher's layers.
    """
    spec = recipe.student.attention_layers
    if is_auto(spec) and (recipe.teacher is None or recipe.student_dir is not None):
        raise RecipeError(
            f"student.attention_layers: {spec} seeds a linear student from the teacher and "
            "restores layers from it: give a teacher and no student_dir"
        )
    if recipe.teacher is None:
        return
    layers = teacher_config(recipe.teacher).num_layers
    try:
        if is_auto(spec):
            auto_budget(spec, layers)
        else:
            parse_attention_layers(spec, layers)
    except ValueError as exc:
        raise RecipeError(f"student.attention_layers: {exc}") from exc


def _load_models(recipe: Recipe, device: torch.device) -> tuple[DecoderLM | None, DecoderLM]:
    """The frozen teacher and the student seeded from it (float32), on ``device``; or no
    teacher and the recipe's ``student_dir``."""
    if recipe.student_dir is not None:
        return None, load_student(recipe.student_dir, dtype=torch.float32, device=device)
    teacher = load_teacher(
        recipe.teacher, dtype=recipe.resolved_teacher_dtype, verify=recipe.verify_teacher
    )
    spec = recipe.student.attention_layers
    student = seed(
        teacher,
        attention_layers="none" if is_auto(spec) else spec,
        mixer=recipe.student.mixer,
        seed=recipe.student.seed,
    )
    return teacher.to(device), student.float().to(device)


def _data_context(
    recipe: Recipe, teacher: DecoderLM, procs: Processes
) -> tuple[DataContext, dict | None]:
    """What rendering the data needs from the teacher, and the built-in shapes data if used."""
    data = recipe.data
    ctx = DataContext(
        teacher.config,
        teacher.config.teacher.get("directory"),
        data.system_message,
        data.on_bad_image,
        data.max_skipped_fraction,
    )
    shapes = None
    if any(s.is_builtin for s in [*data.train, *data.eval]):
        with procs.main_first():
            shapes = shapes_dataset(data.shapes, data.cache_dir)
    return ctx, shapes


def _write_student(run: Run, student: DecoderLM, started: float) -> dict:
    """Write ``output_dir/student`` and ``report.json`` (process 0); the report.

    Args:
        run: The run.
        student: The trained student.
        started: When the run started (``time.perf_counter``).
    """
    student_dir = run.out / "student"
    if run.procs.is_main:
        image_tokenizer = None
        if run.omni is not None:
            image_tokenizer = run.omni.image_tokenizer
        elif run.recipe.omni is not None:  # resumed after its last stage: no stage loaded it
            image_tokenizer = image_tokenizer_for(run.recipe)[0]
        student.save_pretrained(student_dir, overwrite=True, image_tokenizer=image_tokenizer)
    run.procs.barrier()
    result = {
        "student_dir": str(student_dir),
        "output_dir": str(run.out),
        "teacher": run.recipe.teacher,
        "student_dir_start": run.recipe.student_dir,
        "processes": run.procs.world,
        "deepspeed": run.recipe.distributed.deepspeed,
        "stages": run.history,
        "layout": student.config.layout,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if run.procs.is_main:
        atomic_write_text(run.out / "report.json", json.dumps(result, indent=2))
    return result
