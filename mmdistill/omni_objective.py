"""What an OmniMamba stage optimises: each task's cross-entropy over its own vocabulary, summed.

* **mmu** (understanding): the student's chat-format sequences, run with the mmu adapter; the
  next-token cross-entropy of the text head over the answers only (as OmniMamba): the tokens of
  each assistant turn, from after the assistant prefix up to and including its end-of-turn
  token (:func:`answer_targets`). A model whose format has no turns (plain text) is trained on
  every real text target except image-context tokens. Questions and system prompts are left
  out on purpose: the demo teacher was trained on answers only, so its students predict
  nothing useful there, and fitting those tokens moves the shared adapter away from answering.
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
from .metrics import token_nll
from .model import DecoderLM
from .objective import image_context_id, next_token_ce


def answer_targets(input_ids: torch.Tensor, header: list[int], stops: list[int]) -> torch.Tensor:
    """``[b, l]`` True at the tokens of assistant turns: after each ``header`` up to and
    including the next token in ``stops`` (a packed sequence may hold several turns)."""
    b, l = input_ids.shape
    h = len(header)
    idx = torch.arange(l, device=input_ids.device).expand(b, l)
    start = torch.zeros_like(input_ids, dtype=torch.bool)
    if 0 < h <= l:
        windows = input_ids.unfold(1, h, 1) == torch.tensor(header, device=input_ids.device)
        start[:, h:] = windows.all(-1)[:, : l - h]
    end = torch.isin(input_ids, torch.tensor(stops, device=input_ids.device))
    last_start = torch.where(start, idx, -1).cummax(1).values
    ended = torch.where(end, idx, -1).cummax(1).values
    ended_before = torch.cat([ended.new_full((b, 1), -1), ended[:, :-1]], dim=1)
    return (last_start >= 0) & (last_start > ended_before)


def answer_ce(
    logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor, answers: torch.Tensor
) -> torch.Tensor:
    """Mean next-token cross-entropy over the real targets that are answer tokens."""
    keep = mask[:, 1:].bool() & mask[:, :-1].bool() & answers[:, 1:]
    nll = token_nll(logits[:, :-1], input_ids[:, 1:])
    return (nll * keep).sum() / keep.sum().clamp(min=1)


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

    def __init__(self, student: DecoderLM, header: list[int] | None = None, stops=()):
        super().__init__()
        self.student = student
        self.ignore_id = image_context_id(student)
        self.header, self.stops = list(header or []), list(stops)

    def forward(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        parts = {}
        if batch.mmu is not None:
            self.student.use_task("mmu")
            b = batch.mmu
            logits = self.student(b.input_ids, b.pixel_values, b.attention_mask).logits
            if self.header:
                answers = answer_targets(b.input_ids, self.header, self.stops)
                parts["mmu"] = answer_ce(logits, b.input_ids, b.attention_mask, answers)
            else:
                parts["mmu"] = next_token_ce(logits, b.input_ids, b.attention_mask, self.ignore_id)
        if batch.t2i is not None:
            self.student.use_task("t2i")
            parts["t2i"] = t2i_loss(self.student, batch.t2i.input_ids, batch.t2i.attention_mask)
        return {"loss": sum(parts.values()), **parts}
