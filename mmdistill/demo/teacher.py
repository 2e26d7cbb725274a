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

:func:`evaluate_answers` measures held-out accuracy (greedy, one question per prompt, as HoVLE's
``chat()`` asks it) for any HoVLE-front-end :class:`~mmdistill.model.DecoderLM`, students
included.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..data.synthetic import ShapeSample, answer_accuracy
from ..frontends.hovle import chat_prompt, prepare_images
from ..generation import generate
from ..model import DecoderLM
from ..teachers.builtin import SHAPES_HOVLE_DIR
from ..tokenizer import Tokenizer

__all__ = [
    "BUILTIN_NAME",
    "DEMO_KINDS",
    "RECORD_NAME",
    "SHIPPED_DIR",
    "answer_questions",
    "evaluate_answers",
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
_SEP = "<|im_end|>"


@torch.no_grad()
def answer_questions(
    model: DecoderLM,
    tokenizer: Tokenizer,
    questions: Sequence[tuple[Any, str]],
    batch_size: int = 64,
    max_new_tokens: int = 4,
) -> list[str]:
    """Greedy answers to ``(image, question)`` pairs, each prompted as HoVLE's ``chat()`` does.

    Args:
        model: A :class:`DecoderLM` with the HoVLE front-end (teacher or student).
        tokenizer: Its tokenizer.
        questions: ``(PIL image or path, question)`` pairs.
        batch_size: Prompts per generation batch (left-padded).
        max_new_tokens: Most answer tokens.

    Returns:
        The decoded answers (up to ``<|im_end|>``, stripped), in order.
    """
    config = model.config
    stop = tokenizer.token_to_id(_SEP)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    answers: list[str] = []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        pixel_values, tiles = prepare_images(config, [image for image, _ in chunk])
        prompts = [
            tokenizer.encode(chat_prompt(config, question, [n]))
            for (_, question), n in zip(chunk, tiles, strict=True)
        ]
        length = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), length), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, prompt in enumerate(prompts):
            ids[b, length - len(prompt) :] = torch.tensor(prompt)
            mask[b, length - len(prompt) :] = 1
        out = generate(
            model,
            ids.to(model.device),
            attention_mask=mask.to(model.device),
            pixel_values=pixel_values.to(model.device),
            max_new_tokens=max_new_tokens,
            eos_token_id=stop,
            pad_token_id=pad,
        )
        for row in out[:, length:].tolist():
            answers.append(tokenizer.decode(row[: row.index(stop)] if stop in row else row).strip())
    return answers


def evaluate_answers(
    model: DecoderLM,
    tokenizer: Tokenizer,
    samples: Sequence[ShapeSample],
    batch_size: int = 64,
) -> dict[str, Any]:
    """Held-out answer accuracy, overall and per question kind.

    Args:
        model: A HoVLE-front-end :class:`DecoderLM`.
        tokenizer: Its tokenizer.
        samples: Samples whose question/answer turns are asked one per prompt.
        batch_size: Prompts per generation batch.

    Returns:
        ``{"accuracy", "questions", "per_kind": {kind: accuracy}, "counts": {kind: n},
        "predictions": [...]}``.
    """
    questions, references, kinds = [], [], []
    for sample in samples:
        for (question, answer), kind in zip(sample.qa, sample.qa_kinds, strict=True):
            questions.append((sample.image, question))
            references.append(answer)
            kinds.append(kind)
    predictions = answer_questions(model, tokenizer, questions, batch_size=batch_size)
    per_kind, counts = {}, {}
    for kind in dict.fromkeys(kinds):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        per_kind[kind] = answer_accuracy(
            [predictions[i] for i in idx], [references[i] for i in idx]
        )
        counts[kind] = len(idx)
    return {
        "accuracy": answer_accuracy(predictions, references),
        "questions": len(references),
        "per_kind": per_kind,
        "counts": counts,
        "predictions": predictions,
    }
