"""Whether the student a recipe will produce can be exported, before anything trains."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..attention_layers import is_auto
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
        configs = [read_student_config(Path(recipe.student_dir))]
    else:
        spec, teacher = recipe.student, teacher_config(recipe.teacher)
        layouts = [spec.attention_layers]
        if is_auto(spec.attention_layers):
            layouts = ["none", "all"]  # any layer may keep attention: what blocks either
        configs = [planned_config(teacher, layout, spec.mixer) for layout in layouts]
    if any(stage.tasks for stage in recipe.stages) and configs[0].image_vocab is None:
        configs = [
            replace(c, image_vocab={"added by": "the recipe's task stages"}) for c in configs
        ]
    verdicts = [export_verdict(config) for config in configs]
    reasons = list(dict.fromkeys(r for v in verdicts for r in v["reasons"]))
    return {**verdicts[0], "exportable": not reasons, "reasons": reasons}
