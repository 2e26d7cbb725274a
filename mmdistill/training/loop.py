"""One stage's training loop: micro-steps, gradient accumulation, clipping, the optimiser step,
the non-finite guard, metrics, periodic checkpoints and the held-out loss.

A non-finite loss (checked before every backward, agreed across processes) or gradient norm
(checked before the optimiser step; with DeepSpeed, after it) stops the run with
:class:`~mmdistill.errors.TrainingError` and writes nothing, so the last good checkpoint stays the
latest.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from ..data.loader import Batch
from ..errors import TrainingError
from ..recipe import StageSpec
from .checkpoints import save_checkpoint
from .progress import StageProgress
from .state import Run, Stage


@dataclass
class StepSums:
    """What the micro-steps of one optimiser step add up to.

    Attributes:
        lr: The learning rate of the step.
        started: When the step started (``time.perf_counter``).
        sums: Each loss term summed over the micro-steps.
        tokens: Real tokens of this process's micro-batches.
    """

    lr: float
    started: float = field(default_factory=time.perf_counter)
    sums: dict[str, float] = field(default_factory=dict)
    tokens: int = 0

    def add(self, out: dict[str, torch.Tensor], tokens: int) -> None:
        """Add one micro-step's loss terms and tokens."""
        self.tokens += tokens
        for key, value in out.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value.detach())


def run_stage(run: Run, stage: Stage, teacher) -> None:
    """Train ``stage`` from ``stage.start`` to its last step, then measure its held-out loss.

    Args:
        run: The run.
        stage: The stage, built (and resumed) by the caller; its report is filled in.
        teacher: The frozen teacher's forward (a ``TeacherForward`` or its DeepSpeed engine).
    """
    spec, procs, report = stage.spec, run.procs, stage.report
    every = run.recipe.checkpoint.every
    began = time.perf_counter() - report.seconds
    with StageProgress(run, stage) as progress:
        for step in range(stage.start, stage.steps):
            sums = StepSums(lr=stage.optimizer.param_groups[0]["lr"])
            for micro in range(spec.grad_accum):
                batch = next(stage.batches).to(procs.device)
                out = micro_step(run, stage, teacher, batch)
                loss = out["loss"]
                if not procs.all_finite(loss.detach()):
                    raise _non_finite(run, spec, step + 1, "loss", float(loss.detach()))
                _backward(run, stage, loss, last=micro == spec.grad_accum - 1)
                sums.add(out, batch.tokens)
            grad_norm = _optimizer_step(run, stage, step)
            record = _step_record(run, stage, step, sums, grad_norm)
            report.add_step(record, time.perf_counter() - began)
            run.metrics.write(record)
            progress.update(record, report)
            if every and (step + 1) % every == 0 and step + 1 < stage.steps:
                save_checkpoint(run, stage.index, step + 1, stage.student, stage)
            for callback in run.callbacks:
                callback(record)
    if run.recipe.data.eval and not spec.tasks:
        report.eval_loss = evaluate(run, stage, teacher)
    report.skipped = stage.batches.skipped()
    report.seconds = time.perf_counter() - began
    report.tokens_per_second = report.tokens / max(report.seconds, 1e-9)


def micro_step(run: Run, stage: Stage, teacher, batch: Batch) -> dict[str, torch.Tensor]:
    """The teacher's forward, then the student's loss on one micro-batch (its terms too); a task
    stage has no teacher: its objective takes the :class:`~mmdistill.data.t2i.TaskBatch`."""
    if stage.spec.tasks:
        with _autocast(run):
            return stage.model(batch)
    pairs, teacher_logits = teacher(
        batch.input_ids, batch.attention_mask, batch.pixel_values, stage.layers, stage.logits
    )
    with _autocast(run):
        return stage.model(
            batch.input_ids, batch.attention_mask, batch.pixel_values, pairs, teacher_logits
        )


def _autocast(run: Run) -> torch.autocast:
    """bf16 autocast for the student's forward (``precision: bf16`` without DeepSpeed)."""
    enabled = run.recipe.precision == "bf16" and not run.deepspeed
    return torch.autocast(run.procs.device.type, dtype=torch.bfloat16, enabled=enabled)


def _non_finite(run: Run, spec: StageSpec, step: int, what: str, value) -> TrainingError:
    """The error that stops the run at a non-finite loss or gradient norm."""
    if run.last_checkpoint is not None:
        kept = f"the last good checkpoint is {run.last_checkpoint}"
        again = "then rerun with --resume to continue from it"
    else:
        kept = "no checkpoint had been written yet"
        again = "then rerun it (without --resume: there is nothing to resume)"
    clip = (
        f"lower clip_grad (now {spec.clip_grad})" if spec.clip_grad else "set clip_grad (e.g. 1.0)"
    )
    index = next(i for i, s in enumerate(run.recipe.stages) if s is spec)
    return TrainingError(
        f"stage '{spec.name}' step {step}: the {what} is not finite ({value}); stopped "
        f"before updating the weights; {kept}. Lower stages.{index}.lr "
        f"(now {spec.lr:g}), {clip}, or check the data; {again}",
        completed=run.completed(),
    )


def _backward(run: Run, stage: Stage, loss: torch.Tensor, last: bool) -> None:
    """Accumulate one micro-step's gradients (DDP synchronises on the ``last`` one only).

    A DeepSpeed engine accumulates by itself and steps at the accumulation boundary.
    """
    if stage.engine is not None:
        stage.engine.backward(loss)
        stage.engine.step()
        return
    sync = stage.model.no_sync() if run.procs.world > 1 and not last else nullcontext()
    with sync:
        (loss / stage.spec.grad_accum).backward()


def _optimizer_step(run: Run, stage: Stage, step: int) -> float | None:
    """Clip, check and apply the accumulated gradients; returns their norm.

    Raises:
        TrainingError: the gradient norm is not finite (the weights are not updated; under
            DeepSpeed, the engine has already stepped).
    """
    spec = stage.spec
    if stage.engine is not None:
        norm = stage.engine.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else None
        if grad_norm is not None and not run.procs.all_finite(grad_norm):
            raise _non_finite(run, spec, step + 1, "gradient norm", grad_norm)
        return grad_norm
    limit = spec.clip_grad if spec.clip_grad else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(stage.params, limit))
    if not run.procs.all_finite(grad_norm):
        stage.optimizer.zero_grad(set_to_none=True)
        raise _non_finite(run, spec, step + 1, "gradient norm", grad_norm)
    stage.optimizer.step()
    stage.scheduler.step()
    stage.optimizer.zero_grad(set_to_none=True)
    return grad_norm


def _step_record(
    run: Run, stage: Stage, step: int, sums: StepSums, grad_norm: float | None
) -> dict:
    """The metrics record of an optimiser step (means and tokens over the processes)."""
    procs = run.procs
    keys = sorted(sums.sums)
    means = procs.mean([sums.sums[k] / stage.spec.grad_accum for k in keys])
    step_tokens = procs.sum(sums.tokens)
    seconds = time.perf_counter() - sums.started
    run.global_step += 1
    return {
        "stage": stage.spec.name,
        "stage_index": stage.index,
        "step": step + 1,
        "steps": stage.steps,
        "global_step": run.global_step,
        **{k: round(v, 8) for k, v in zip(keys, means, strict=True)},
        "lr": sums.lr,
        "grad_norm": grad_norm,
        "step_tokens": step_tokens,
        "tokens_per_s": round(step_tokens / max(seconds, 1e-9), 1),
    }


@torch.no_grad()
def evaluate(run: Run, stage: Stage, teacher) -> float:
    """Mean loss over ``data.eval_batches`` held-out batches (the same order every stage)."""
    data = run.recipe.data
    (stage.engine if stage.engine is not None else stage.student).eval()
    batches = run.batches(data.eval, (data.seed, 1 << 20), stage.spec.batch_size)
    total = 0.0
    for _ in range(data.eval_batches):
        batch = next(batches).to(run.procs.device)
        total += float(micro_step(run, stage, teacher, batch)["loss"])
    return run.procs.mean([total / data.eval_batches])[0]
