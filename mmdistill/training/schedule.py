"""The learning-rate schedule, AdamW's parameter groups and a stage's length in steps.

These are the one definition of each, shared by the distillation trainer and the demo teacher's
builder.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..recipe import ScheduleSpec, StageSpec


def lr_multiplier(spec: ScheduleSpec, total: int) -> Callable[[int], float]:
    """Learning-rate multiplier as a function of completed optimiser steps.

    Linear warmup to 1 over the warmup steps (step ``i`` uses ``(i + 1) / warmup``); then
    ``constant``: 1; ``cosine``: half a cosine from 1 to ``min_lr_ratio`` at ``total``; ``wsd``:
    1 until the last ``decay`` steps, then linear to ``min_lr_ratio`` at ``total``.

    Args:
        spec: The schedule.
        total: Optimiser steps of the whole schedule.

    Returns:
        ``multiplier(step)``, for ``torch.optim.lr_scheduler.LambdaLR``.
    """
    warm = spec.warmup_steps if spec.warmup_steps is not None else round(spec.warmup_ratio * total)
    warm = min(warm, total)
    decay = spec.decay_steps if spec.decay_steps is not None else round(spec.decay_ratio * total)
    decay = max(0, min(decay, total - warm))
    low = spec.min_lr_ratio

    def multiplier(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if spec.kind == "constant":
            return 1.0
        if spec.kind == "cosine":
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress))
        start = total - decay
        if step < start or decay == 0:
            return 1.0
        return 1.0 - (1 - low) * min(1.0, (step - start) / decay)

    return multiplier


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: weight decay on matrices only. The one policy of every optimiser
    in the package (the distillation stages and the demo teacher's builder).

    No-decay policy: parameters with fewer than two dimensions (norm weights, biases and the
    mixers' per-channel vectors such as ``A_log``, ``D`` and ``dt_bias``) never decay; matrices,
    embedding tables and the LM head included, do. Frozen parameters (``requires_grad`` false)
    are left out. Parameters keep their module order.

    Args:
        model: The model being trained.
        weight_decay: AdamW weight decay of the decayed group.

    Returns:
        ``[{"params": decayed, "weight_decay": weight_decay}, {"params": rest,
        "weight_decay": 0.0}]``.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def stage_steps(stage: StageSpec, processes: int, seq_len: int) -> int:
    """A stage's length in optimiser steps (``stage.steps``, or its tokens rounded up to steps).

    Args:
        stage: The stage.
        processes: Processes of the run (each takes ``batch_size`` sequences per micro-step).
        seq_len: Tokens per sequence.
    """
    if stage.steps is not None:
        return stage.steps
    per_step = stage.batch_size * stage.grad_accum * processes * seq_len
    return math.ceil(stage.tokens / per_step)


def make_optimizer(
    model: nn.Module, stage: StageSpec, total: int, fused: bool
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``model``'s trainable parameters and the stage's schedule.

    Args:
        model: The student (its frozen parameters are left out).
        stage: Learning rate, weight decay, betas, eps and schedule.
        total: The stage's optimiser steps.
        fused: Use the fused CUDA implementation.
    """
    optimizer = torch.optim.AdamW(
        param_groups(model, stage.weight_decay),
        lr=stage.lr,
        betas=stage.betas,
        eps=stage.eps,
        fused=fused,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(stage.schedule, total))
    return optimizer, scheduler
