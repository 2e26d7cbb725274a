"""``student.attention_layers: auto:K`` in a run.

The student is seeded linear and trained through the layer-wise stages. Before the first
stage that is not layer-wise (or the stage ``student.layout_before`` names; or after the last
stage, if every stage is layer-wise), every layer is scored on calibration batches
(:func:`~mmdistill.layer_scores.score_layers`, under bf16 autocast when the recipe's precision
is bf16). The K layers of largest gain (or, with ``student.layout_search: greedy``, the K that
:func:`~mmdistill.layer_scores.search_layers` picks) are restored from the teacher, and the
hybrid trains on. The choice and every score go into the student's config (``layout``), the
log and the run report. Calibration batches come from ``data.eval`` (else ``data.train``) in a
fixed order, the same in every process. A run resumed before the choice makes it again,
identically; one resumed after it reads it from the checkpoint.
"""

from __future__ import annotations

import time

import torch

from ..attention_layers import auto_budget, is_auto
from ..data.loader import make_iterator
from ..layer_scores import score_layers, search_layers, with_attention
from ..model import DecoderLM
from .state import Run

LAYOUT_SEED = 7919
"""Seeds the calibration batches' order (with ``data.seed``), apart from every stage's."""


def layout_due(run: Run, student: DecoderLM, index: int | None) -> bool:
    """Whether the auto layout is chosen now: before stage ``index`` (``None``: after the
    last stage)."""
    spec = run.recipe.student.attention_layers
    if student.config.layout is not None or not is_auto(spec):
        return False
    if index is None:
        return True
    stage = run.recipe.stages[index]
    before = run.recipe.student.layout_before
    if before is not None:
        return stage.name == before
    return bool(stage.tasks) or not stage.loss.layerwise


def calibration_batches(run: Run) -> list:
    """``layout_batches`` batches of the first stage's size, one fixed order for all processes."""
    recipe = run.recipe
    data = recipe.data
    iterator = make_iterator(
        data.eval or data.train,
        run.data,
        run.shapes,
        data.seq_len,
        data.packing,
        (data.seed, LAYOUT_SEED),
        recipe.stages[0].batch_size,
        0,
        1,
    )
    batches = [next(iterator) for _ in range(recipe.student.layout_batches)]
    return [(b.input_ids, b.pixel_values, b.attention_mask.bool()) for b in batches]


def choose_layout(run: Run, teacher: DecoderLM, student: DecoderLM, index: int | None):
    """The hybrid the auto spec picks from the linear ``student`` (module docstring)."""
    spec = run.recipe.student.attention_layers
    budget = auto_budget(spec, student.config.num_layers)
    start = time.perf_counter()
    batches = calibration_batches(run)
    run.log(f"{spec}: scoring {len(student.layers)} layers on {len(batches)} calibration batches")
    bf16 = run.recipe.precision == "bf16"  # the training numerics (autocast over float32)
    search = run.recipe.student.layout_search
    with torch.autocast(run.procs.device.type, dtype=torch.bfloat16, enabled=bf16):
        if search == "greedy":
            found = search_layers(teacher, student, batches, budget, _round_logger(run, spec))
            scores = found.first
        else:
            found = scores = score_layers(teacher, student, batches)
    before = run.recipe.stages[index].name if index is not None else None
    seconds = round(time.perf_counter() - start, 2)
    layout = found.layout(spec, budget, before, seconds=seconds)
    chosen = layout["chosen"]
    run.log(
        f"{spec}: attention kept in layers {chosen} (KL {scores.linear_kl:.4g} linear; "
        f"gains alone {', '.join(f'{scores.gains[i]:.3g}' for i in chosen)}; "
        f"{len(scores.clear())} layers of clear gain)"
    )
    return with_attention(student, teacher, chosen, layout)


def _round_logger(run: Run, spec: str):
    return lambda done, budget: run.log(f"{spec}: greedy search, round {done} of {budget} done")
