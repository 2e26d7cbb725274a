"""Whether the student a recipe will produce can be exported, before anything trains."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..checkpoint import read_student_config
from ..recipe import Recipe
from ..seeding import planned_config
from ..teachers import teacher_config
from .granite import export_verdict


def planned_export(recipe: Recipe) -> dict:
    """:func:`~mmdistill.export.granite.export_verdict` of the recipe's student, from the
    teacher's ``config.json`` alone (or the starting student's).

    Raises:
        MmdistillError: the teacher's config cannot be read (e.g. a hub id offline).
    """
    if recipe.student_dir is not None:
        config = read_student_config(Path(recipe.student_dir))
    else:
        spec = recipe.student
        config = planned_config(teacher_config(recipe.teacher), spec.attention_layers, spec.mixer)
    if any(stage.tasks for stage in recipe.stages) and config.image_vocab is None:
        config = replace(config, image_vocab={"added by": "the recipe's task stages"})
    return export_verdict(config)
