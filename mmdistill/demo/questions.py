"""The demo's held-out questions asked of a model: answer accuracy, overall and per kind.

Each question of a :class:`~mmdistill.data.synthetic.ShapeSample` is asked on its own, with its
image, prompted by the model's chat format exactly as HoVLE's ``chat()`` prompts a single question
(:meth:`mmdistill.chat_format.ChatFormat.encode` of the one user turn with the assistant prefix),
and answered greedily by :func:`mmdistill.answers.greedy_answers`, stopping at ``<|im_end|>`` as
``chat()`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..answers import Question, greedy_answers
from ..chat import place_images
from ..chat_format import chat_format_for
from ..data.synthetic import ShapeSample, answer_accuracy
from ..frontends.multimodal import prepare_images
from ..model import DecoderLM
from ..tokenizer import Tokenizer

_END_OF_TURN = "<|im_end|>"


def shape_questions(
    model: DecoderLM, tokenizer: Tokenizer, samples: Sequence[ShapeSample]
) -> tuple[list[Question], list[str]]:
    """Every question/answer turn of ``samples`` as a one-turn prompt, and its question kind."""
    fmt = chat_format_for(model.config, tokenizer)
    questions, kinds = [], []
    for sample in samples:
        tiles = prepare_images(model.config, [sample.image])[1]
        for (question, answer), kind in zip(sample.qa, sample.qa_kinds, strict=True):
            messages = place_images([{"role": "user", "content": question}], 1, "a question")
            ids = fmt.encode(messages, tiles, add_generation_prompt=True)
            questions.append(Question(ids, [sample.image], question, answer))
            kinds.append(kind)
    return questions, kinds


def evaluate_answers(
    model: DecoderLM,
    tokenizer: Tokenizer,
    samples: Sequence[ShapeSample],
    batch_size: int = 64,
    max_new_tokens: int = 4,
) -> dict[str, Any]:
    """Held-out answer accuracy, overall and per question kind.

    Args:
        model: A HoVLE-front-end :class:`DecoderLM` (teacher or student).
        tokenizer: Its tokenizer.
        samples: Samples whose question/answer turns are asked one per prompt.
        batch_size: Prompts per generation batch (left-padded).
        max_new_tokens: Most answer tokens.

    Returns:
        ``{"accuracy", "questions", "per_kind": {kind: accuracy}, "counts": {kind: n},
        "predictions": [...]}``.
    """
    questions, kinds = shape_questions(model, tokenizer, samples)
    stop = tokenizer.token_to_id(_END_OF_TURN)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    predictions = greedy_answers(
        model,
        tokenizer,
        questions,
        [stop],
        pad_id=pad,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
    )
    references = [q.reference for q in questions]
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
