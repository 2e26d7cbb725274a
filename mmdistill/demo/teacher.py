"""The demo's embedded multimodal teacher, ``builtin:shapes-hovle``, as the demo uses it.

``builtin:shapes-hovle`` is a HoVLE-format directory shipped in the package (:data:`SHIPPED_DIR`;
``config.json`` in HoVLE's layout, HoVLE tensor names with the grouped ``wqkv``, an
InternLM2-style sentencepiece tokenizer) holding a model of about 1.2M parameters trained from
scratch on the procedural shape images of :mod:`mmdistill.data.synthetic`. It reads 56 px images
as one tile: 4x4 patches of 14 px, pixel-shuffled into 4 image tokens, one per cell of the
images' 2x2 grid. It was trained on the ``builtin:shapes`` conversation format, tokenised as
``mmdistill run`` and ``mmdistill eval`` tokenise it, and answers the generated questions of
:data:`DEMO_KINDS` in HoVLE's chat format, so the demo can show a student recovering what a
teacher knows. It is rebuilt by ``scripts/build_demo_teacher.py``
(:mod:`mmdistill.demo.teacher_builder`, which the demo never imports).

Held-out accuracy is measured by :func:`mmdistill.demo.questions.evaluate_answers`.
"""

from __future__ import annotations

from ..teachers.builtin import SHAPES_HOVLE_DIR

__all__ = [
    "BUILTIN_NAME",
    "DEMO_KINDS",
    "RECORD_NAME",
    "SHIPPED_DIR",
]

BUILTIN_NAME = "shapes-hovle"
DEMO_KINDS: tuple[str, ...] = ("count", "colour_at", "size", "side", "colour_of_shape")
"""Question kinds the demo teacher is trained on and the demo evaluates. Left out, because a
three-minute CPU build does not learn them (they stay near the question-only baseline): the
attribute-conditioned counts ``count_shape`` and ``count_colour``, ``exists`` (a colour-shape
conjunction) and ``shape_at`` (its "on the left"/"at the top" forms need uniqueness checks)."""

RECORD_NAME = "shapes_teacher.json"
"""The build record written next to the teacher (config, losses, time, held-out accuracy)."""
SHIPPED_DIR = SHAPES_HOVLE_DIR
"""Where the repository ships the teacher built by ``scripts/build_demo_teacher.py`` with the
default config (about 5 MB), so ``builtin:shapes-hovle`` needs no training."""
