"""What a distillation stage optimises: the layer-wise MSE and end-to-end KL/CE losses, the
teacher's side of a step and the student's (:class:`TeacherForward`, :class:`DistillObjective`).
Why each stage has these losses: docs/method.md.

Losses (:class:`DistillObjective`):

* **layer-wise** (MSE only; stages 1-2): one teacher forward with ``capture_mixers=True`` stopped
  after the last converted layer gives each converted layer's input (the teacher's
  ``input_norm(x)``) and target (the teacher's attention output); each student mixer runs on that
  input. Loss = ``mse_weight * mean over layers of MSE(mixer(u), attn(u))``. No full student
  forward: layers train independently. The teacher is frozen and never modified, so it holds the
  original Q/K/V for stage 2's targets.
* **end-to-end** (KL and/or CE; stage 3): student forward on the batch; ``kl_weight *
  KL(teacher || student)`` over the vocabulary with temperature T (scaled by T², averaged over
  real tokens) plus ``ce_weight *`` next-token cross-entropy (targets that are real tokens and not
  image-context tokens), plus the layer MSE above when ``mse_weight > 0``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .metrics import token_kl, token_nll
from .model import DecoderLM


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values [b, l]`` over the positions where ``mask`` is nonzero (all if ``None``)."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def layer_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over hidden units, averaged over real tokens.

    Args:
        pred, target: ``[b, l, d]``.
        mask: ``[b, l]`` 1 for real tokens, or ``None``.

    Returns:
        Scalar float32.
    """
    return _masked_mean((pred.float() - target.float()).pow(2).mean(-1), mask)


def kl_per_token(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """KL(teacher || student) per token, summed over the vocabulary and averaged over tokens.

    :func:`mmdistill.metrics.token_kl` (in chunks of positions; only the student's side is in
    the autograd graph).

    Args:
        student_logits, teacher_logits: ``[b, l, vocab]``.
        mask: ``[b, l]`` 1 for tokens that count, or ``None``.
        temperature: both distributions are ``softmax(logits / T)``; the result is scaled by T².

    Returns:
        Scalar float32 (nats per token).
    """
    kl = token_kl(student_logits, teacher_logits, temperature) * (temperature * temperature)
    return _masked_mean(kl, mask)


def next_token_ce(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    mask: torch.Tensor | None,
    ignore_id: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of predicting token t+1 at position t (:func:`mmdistill.metrics.token_nll`).

    Args:
        logits: ``[b, l, vocab]``.
        input_ids: ``[b, l]``.
        mask: ``[b, l]`` real-token mask, or ``None``; a target counts when it and its position
            are real.
        ignore_id: a token id never used as a target (HoVLE's image-context token).

    Returns:
        Scalar float32.
    """
    targets = input_ids[:, 1:]
    keep = torch.ones_like(targets, dtype=torch.bool)
    if mask is not None:
        keep = keep & mask[:, 1:].bool() & mask[:, :-1].bool()
    if ignore_id is not None:
        keep = keep & (targets != ignore_id)
    return _masked_mean(token_nll(logits[:, :-1], targets), keep)


def image_context_id(model: DecoderLM) -> int | None:
    """The image-context token id of a multimodal front-end, if any."""
    vision = model.config.front_end.get("vision") or {}
    return vision.get("img_context_token_id")


def dummy_image_inputs(model: DecoderLM) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One blank tile and its image-token ids, to run the vision path on image-free batches."""
    front = model.config.front_end
    token = image_context_id(model)
    if token is None:
        return None
    size = int(front.get("force_image_size") or front["vision"]["image_size"])
    ids = torch.full((1, int(front["num_image_token"])), token, dtype=torch.long)
    return ids, torch.zeros(1, 3, size, size)


class TeacherForward(nn.Module):
    """The frozen teacher's side of a step, as a module (so DeepSpeed can wrap it).

    Args:
        teacher: the teacher.
    """

    def __init__(self, teacher: DecoderLM):
        super().__init__()
        self.model = teacher

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None,
        layers: list[int],
        logits: bool,
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None]:
        """One teacher forward, stopped after the last needed layer unless logits are needed.

        Args:
            input_ids, attention_mask: ``[b, l]``.
            pixel_values: ``[tiles, 3, s, s]`` or ``None``.
            layers: converted layers whose (mixer input, attention output) pairs are needed.
            logits: also return the logits (end-to-end stages).

        Returns:
            ``([(u_i, y_i) for i in layers], logits [b, l, vocab] or None)``; u, y ``[b, l, d]``.
        """
        stop = len(self.model.layers) if logits else max(layers) + 1
        out = self.model(
            input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            capture_mixers=bool(layers),
            layer_range=(0, stop),
            compute_logits=logits,
        )
        captured = out.captures
        pairs = [captured[i] for i in layers] if layers else []
        return pairs, out.logits


class DistillObjective(nn.Module):
    """The student's side of a step: returns the loss and its parts.

    Args:
        student: the student being trained.
        loss: a :class:`~mmdistill.recipe.LossSpec`.
        checkpoint_mixers: recompute each mixer in the backward pass (layer-wise stages).
        vision_dummy: run the vision path on a blank tile when a batch has no images (keeps
            every process's graph identical when vision parameters train on several processes).
    """

    def __init__(
        self, student: DecoderLM, loss, checkpoint_mixers: bool = False, vision_dummy: bool = False
    ):
        super().__init__()
        self.student = student
        self.loss = loss
        self.layers = student.mixer_layers()
        self.checkpoint_mixers = checkpoint_mixers
        self.vision_dummy = dummy_image_inputs(student) if vision_dummy else None
        self.ignore_id = image_context_id(student)

    def mixer_mse(
        self, pairs: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Mean over converted layers of the MSE of each mixer on the teacher's input."""
        dtype = self.student.dtype
        losses = []
        for i, (u, target) in zip(self.layers, pairs, strict=True):
            mixer = self.student.layers[i].mixer
            u = u.to(dtype)
            if self.checkpoint_mixers and torch.is_grad_enabled():
                pred = checkpoint(mixer, u, None, mask, use_reentrant=False)
            else:
                pred = mixer(u, mask=mask)
            losses.append(layer_mse(pred, target, mask))
        return torch.stack(losses).mean()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None,
        pairs: list[tuple[torch.Tensor, torch.Tensor]],
        teacher_logits: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """Loss of one micro-batch.

        Args:
            input_ids, attention_mask: ``[b, l]``.
            pixel_values: ``[tiles, 3, s, s]`` or ``None``.
            pairs: the teacher's (mixer input, attention output) per converted layer.
            teacher_logits: ``[b, l, vocab]`` (end-to-end stages) or ``None``.

        Returns:
            ``{"loss": scalar, "mse"|"kl"|"ce": scalar (the unweighted terms present)}``.
        """
        spec = self.loss
        mask = None if bool(attention_mask.all()) else attention_mask
        parts: dict[str, torch.Tensor] = {}
        total = None
        if spec.mse_weight > 0:
            parts["mse"] = self.mixer_mse(pairs, mask)
            total = spec.mse_weight * parts["mse"]
        if not spec.layerwise:
            embeds = self.student.embed(input_ids, pixel_values)
            if self.vision_dummy is not None and pixel_values is None:
                ids, tile = self.vision_dummy
                blank = self.student.embed(
                    ids.to(input_ids.device), tile.to(embeds.device, embeds.dtype)
                )
                embeds = embeds + 0.0 * blank.sum()
            logits = self.student(inputs_embeds=embeds, attention_mask=attention_mask).logits
            if spec.kl_weight > 0:
                parts["kl"] = kl_per_token(logits, teacher_logits, mask, spec.kl_temperature)
                term = spec.kl_weight * parts["kl"]
                total = term if total is None else total + term
            if spec.ce_weight > 0:
                parts["ce"] = next_token_ce(logits, input_ids, mask, self.ignore_id)
                term = spec.ce_weight * parts["ce"]
                total = term if total is None else total + term
        return {"loss": total, **parts}
