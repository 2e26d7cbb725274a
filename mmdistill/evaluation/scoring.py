"""Teacher and students run on the same scored sequences; their token metrics summed.

Metrics are :mod:`mmdistill.metrics`' (NLL, KL(teacher ‖ student), top-1 agreement), computed only
at the positions that predict scored tokens: the final hidden states there go through each model's
LM head, so logits are never computed for the other positions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from ..frontends.multimodal import prepare_images
from ..metrics import TokenSums, score_tokens
from ..model import DecoderLM
from .documents import ScoredSequence


def batch_inputs(
    batch: Sequence[ScoredSequence], pad_id: int, model_config
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Right-padded ``ids [b, l]``, ``targets [b, l]`` and the batch's image tiles."""
    length = max(len(s.ids) for s in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    targets = torch.zeros(len(batch), length, dtype=torch.bool)
    for i, s in enumerate(batch):
        ids[i, : len(s.ids)] = torch.tensor(s.ids)
        targets[i, : len(s.ids)] = torch.tensor(s.targets)
    pixel_values = prepare_images(model_config, [p for s in batch for p in s.images])[0]
    return ids, targets, pixel_values


def _scored_logits(
    model: DecoderLM, ids: torch.Tensor, targets: torch.Tensor, pixel_values: torch.Tensor | None
) -> torch.Tensor:
    """Logits ``[n, vocab]`` (the model's dtype) at the positions predicting scored tokens.

    Right padding needs no mask: every layer is causal, so real tokens never see the padding.
    """
    device = model.device
    pv = pixel_values.to(device) if pixel_values is not None else None
    out = model(input_ids=ids.to(device), pixel_values=pv, compute_logits=False)
    return model.head_logits(out.last_hidden_state[:, :-1][targets[:, 1:].to(device)])


@torch.no_grad()
def score_sequences(
    teacher: DecoderLM,
    students: Mapping[str, DecoderLM],
    sequences: Sequence[ScoredSequence],
    batch_size: int,
    pad_id: int,
    advance: Callable[[int], None],
) -> tuple[TokenSums, dict[str, TokenSums]]:
    """The teacher's NLL, and each student's NLL, KL and agreement against it.

    Args:
        teacher: the reference model (its config tiles the images).
        students: name -> model.
        sequences: what is scored.
        batch_size: sequences per forward.
        pad_id: the right-padding token id.
        advance: called with the batch size after each batch (progress).

    Returns:
        ``(teacher sums, {name: student sums})``.
    """
    teacher_sums = TokenSums()
    sums = {name: TokenSums() for name in students}
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size]
        ids, targets, pixel_values = batch_inputs(batch, pad_id, teacher.config)
        labels = ids[:, 1:][targets[:, 1:]]
        reference = _scored_logits(teacher, ids, targets, pixel_values)
        teacher_sums.add(score_tokens(reference, labels))
        for name, student in students.items():
            logits = _scored_logits(student, ids, targets, pixel_values)
            sums[name].add(score_tokens(logits, labels, reference))
        advance(len(batch))
    return teacher_sums, sums
