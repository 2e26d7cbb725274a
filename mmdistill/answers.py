"""Greedy answers to prompted questions, in left-padded batches (``mmdistill eval`` and the demo).

A :class:`Question` holds a tokenised prompt (the conversation so far, ending with the assistant
prefix, as :meth:`mmdistill.chat_format.ChatFormat.encode` writes it) and the images its
``<image>`` spans stand for. :func:`greedy_answers` left-pads a batch of prompts, tiles the
batch's images, generates greedily and cuts each answer at its first stop token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .frontends.multimodal import prepare_images
from .generation import generate
from .model import DecoderLM
from .tokenizer import Tokenizer

__all__ = ["Question", "greedy_answers", "left_pad"]


@dataclass
class Question:
    """A question to answer by greedy generation.

    Attributes:
        ids: the prompt (conversation so far, ending with the assistant prefix).
        images: image files (or PIL images) of the prompt, one per image span, in order.
        question: the question text (for reports).
        reference: the reference answer.
    """

    ids: list[int]
    images: list[Any] = field(default_factory=list)
    question: str = ""
    reference: str = ""


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [b, l], attention_mask [b, l])`` of prompts left-padded to the longest."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, length - len(prompt) :] = torch.tensor(prompt)
        mask[i, length - len(prompt) :] = 1
    return ids, mask


def _decode(
    row: list[int], tokenizer: Tokenizer, stop_ids: Sequence[int], stop_text: str | None
) -> str:
    # An id past the tokenizer (an image code a shared text+image vocabulary let through) ends
    # the answer like a stop token: it is not text.
    limit = tokenizer.vocab_size
    cut = next((i for i, t in enumerate(row) if t in stop_ids or t >= limit), len(row))
    text = tokenizer.decode(row[:cut], skip_special_tokens=True)
    if stop_text:
        text = text.split(stop_text)[0]
    return text.strip()


@torch.no_grad()
def greedy_answers(
    model: DecoderLM,
    tokenizer: Tokenizer,
    questions: Sequence[Question],
    stop_ids: Sequence[int],
    *,
    pad_id: int,
    batch_size: int = 1,
    max_new_tokens: int = 16,
    stop_text: str | None = None,
    advance: Callable[[int], None] | None = None,
    decode: str = "auto",
) -> list[str]:
    """Greedy answers to ``questions``, in order.

    Args:
        model: teacher or student.
        tokenizer: its tokenizer.
        questions: prompts and their images (tiled with ``model``'s image settings).
        stop_ids: token ids that end an answer (generation stops there; the answer is cut).
        pad_id: the left-padding token id.
        batch_size: prompts per generation batch.
        max_new_tokens: answer length limit.
        stop_text: the decoded answer is also cut at its first occurrence.
        advance: called with the batch size after each batch (progress).
        decode: the decode path (:func:`mmdistill.generation.generate`).

    Returns:
        The decoded answers (special tokens skipped, stripped).
    """
    answers = []
    device = model.device
    for start in range(0, len(questions), batch_size):
        batch = questions[start : start + batch_size]
        ids, mask = left_pad([q.ids for q in batch], pad_id)
        pixel_values = prepare_images(model.config, [p for q in batch for p in q.images])[0]
        out = generate(
            model,
            ids.to(device),
            attention_mask=mask.to(device),
            pixel_values=pixel_values.to(device) if pixel_values is not None else None,
            max_new_tokens=max_new_tokens,
            eos_token_id=list(stop_ids),
            pad_token_id=pad_id,
            decode=decode,
        )
        for row in out[:, ids.shape[1] :].tolist():
            answers.append(_decode(row, tokenizer, stop_ids, stop_text))
        if advance is not None:
            advance(len(batch))
    return answers
