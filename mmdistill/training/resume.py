"""Resuming a run: finding its checkpoint, checking it fits the recipe, and restoring from it.

``--resume`` continues from the checkpoint ``latest`` names: model, optimiser, scheduler, RNG and
data position, so that on the CPU the rest of the run is bit-identical to an uninterrupted one.
Metric lines written after that checkpoint are dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import read_student_config
from ..errors import CheckpointError
from ..files import read_safetensors
from ..model import DecoderLM, build_from_state_dict
from .checkpoints import CHECKPOINTS, STATE_FILE, latest_checkpoint, list_checkpoints, set_rng_state
from .state import Run, Stage


@dataclass
class ResumePoint:
    """A checkpoint to resume from.

    Attributes:
        directory: The checkpoint.
        state: Its ``trainer_state.json``.
    """

    directory: Path
    state: dict

    @property
    def first_stage(self) -> int:
        """The index of the first stage to run."""
        return self.state["stage"] + (1 if self.state["stage_done"] else 0)


def holds_run(output_dir: str | Path) -> bool:
    """Whether ``output_dir`` holds a run ``--resume`` can continue (or has finished)."""
    out = Path(output_dir)
    return bool(list_checkpoints(out / CHECKPOINTS)) or (out / "student").exists()


def find_resume_point(run: Run, resume: bool) -> ResumePoint | None:
    """The checkpoint to resume from (``resume``), after checking it fits the recipe.

    Raises:
        CheckpointError: ``resume`` without a complete checkpoint, a checkpoint of another recipe
            or process layout, or an output directory that holds a run and no ``resume``.
    """
    root = run.out / CHECKPOINTS
    if not resume:
        if holds_run(run.out):
            raise CheckpointError(
                f"{run.out} already holds a run; pass --resume to continue it, or set another "
                "output_dir"
            )
        return None
    path = latest_checkpoint(root)
    if path is None:
        raise CheckpointError(
            f"--resume: no complete checkpoint in {root} (a run writes one every "
            "checkpoint.every steps and at the end of each stage)"
        )
    state = json.loads((path / STATE_FILE).read_text())
    names = [s.name for s in run.recipe.stages]
    upto = state["stage"] + 1
    if state["stages"][:upto] != names[:upto]:
        raise CheckpointError(
            f"{path} was written by a recipe with stages {state['stages']}; this recipe has {names}"
        )
    if state["deepspeed"] != run.deepspeed or (
        run.deepspeed and not state["stage_done"] and state["world"] != run.procs.world
    ):
        raise CheckpointError(
            f"{path} was written with deepspeed={state['deepspeed']} on {state['world']} "
            "processes; resume it the same way"
        )
    return ResumePoint(path, state)


def resume_run(run: Run, point: ResumePoint, student: DecoderLM) -> DecoderLM:
    """The student of ``point`` (rebuilt from its config: a checkpoint of a task stage has the
    image vocabulary and adapters); loads the run's history and trims the metrics."""
    weights = read_safetensors(point.directory)
    config = read_student_config(point.directory)
    config.teacher = student.config.teacher  # provenance (and tokenizer files) of this run's
    student = build_from_state_dict(config, weights, torch.float32).to(run.procs.device)
    run.history = point.state["history"]
    run.global_step = point.state["global_step"]
    run.last_checkpoint = point.directory
    run.metrics.trim(point.state["stage"], point.state["step"])
    run.log(f"resuming from {point.directory}")
    return student


def resume_stage(stage: Stage, point: ResumePoint, rank: int) -> None:
    """Continue ``stage`` from ``point`` if that checkpoint is inside it: report, data position,
    optimiser, scheduler and RNG.

    Args:
        stage: The freshly built stage.
        point: The checkpoint resumed from.
        rank: This process's index (its RNG file).
    """
    state, directory = point.state, point.directory
    if state["stage"] != stage.index or state["stage_done"]:
        return
    stage.start = state["step"]
    stage.report.restore(state["current"])
    stage.batches.load_state_dict(state["data"])
    if stage.engine is not None:
        stage.engine.load_checkpoint(
            str(directory / "engine"),
            tag="state",
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
    else:
        saved = torch.load(directory / "optimizer.pt", weights_only=True)
        stage.optimizer.load_state_dict(saved["optimizer"])
        stage.scheduler.load_state_dict(saved["scheduler"])
    set_rng_state(torch.load(directory / f"rng-{rank}.pt", weights_only=True))
