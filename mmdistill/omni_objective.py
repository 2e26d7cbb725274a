"""What an OmniMamba stage optimises: each task's cross-entropy over its own vocabulary, summed.

* **mmu** (understanding): the student's chat-format sequences, run with the mmu adapter; the
  next-token cross-entropy of the text head over real text targets (not padding, not HoVLE's
  image-context tokens). Every text target counts, questions as well as answers: the
  conversations are the distillation data, so this keeps the student on the distribution it
  was distilled on.
* **t2i** (generation): t2i rows (:mod:`mmdistill.data.t2i`), run with the t2i adapter; the
  image head's cross-entropy over the codes only (the positions whose next token is an image
  code). With decoupled vocabularies the classes are the K codes; with a shared vocabulary they
  are the joint V + K classes, so probability mass on text tokens is penalised too.

Loss = mmu + t2i (OmniMamba sums them; the balance comes from the batch composition).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .data.t2i import TaskBatch
from .model import DecoderLM
from .objective import image_context_id, next_token_ce


def code_targets(model: DecoderLM, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[b, l-1]`` image-head class of token t+1 at position t, or -100 where t+1 is no code."""
    spec = model.image_vocab.spec
    nxt = input_ids[:, 1:]
    is_code = (nxt >= spec.code_offset) & mask[:, 1:].bool() & mask[:, :-1].bool()
    classes = nxt - spec.code_offset
    if spec.mode == "shared":
        classes = classes + spec.text_vocab_size
    return torch.where(is_code, classes, torch.full_like(classes, -100))


def t2i_loss(model: DecoderLM, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the image codes of t2i rows (the t2i adapter must be active)."""
    logits = model(input_ids, attention_mask=mask, head="image").logits
    targets = code_targets(model, input_ids, mask)
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100
    )


class OmniObjective(nn.Module):
    """The summed task losses of a :class:`TaskBatch` (see module docstring).

    Returns ``{"loss", "mmu"?, "t2i"?}`` from ``forward``.
    """

    def __init__(self, student: DecoderLM):
        super().__init__()
        self.student = student
        self.ignore_id = image_context_id(student)

    def forward(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        parts = {}
        if batch.mmu is not None:
            self.student.use_task("mmu")
            b = batch.mmu
            logits = self.student(b.input_ids, b.pixel_values, b.attention_mask).logits
            parts["mmu"] = next_token_ce(logits, b.input_ids, b.attention_mask, self.ignore_id)
        if batch.t2i is not None:
            self.student.use_task("t2i")
            parts["t2i"] = t2i_loss(self.student, batch.t2i.input_ids, batch.t2i.attention_mask)
        return {"loss": sum(parts.values()), **parts}
