"""The state of a run (:class:`Run`), of one stage (:class:`Stage`) and its report."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from ..data.loader import BatchIterator, make_iterator
from ..data.text import DataContext
from ..model import DecoderLM
from ..recipe import Recipe, StageSpec
from .metrics import MetricsLog
from .processes import Processes


@dataclass
class Run:
    """What every stage of a run shares.

    Attributes:
        recipe: The recipe.
        procs: This process's place in the run.
        console: Where progress and messages go (stderr).
        metrics: The metrics log.
        callbacks: Called with each optimiser step's record, in every process.
        zero: The DeepSpeed ZeRO stage, or ``None`` without DeepSpeed.
        data: What rendering the data needs from the teacher.
        shapes: Paths of the built-in shapes data set, if the recipe uses it.
        omni: The image tokenizer and encoded captions of the task stages (loaded before the
            first of them).
        global_step: Optimiser steps over all stages so far.
        history: The reports of the finished stages.
        last_checkpoint: The newest complete checkpoint written or resumed from.
    """

    recipe: Recipe
    procs: Processes
    console: Console
    metrics: MetricsLog
    callbacks: list[Callable[[dict], None]]
    zero: int | None = None
    data: DataContext | None = None
    shapes: dict[str, Path] | None = None
    omni: Any = None
    global_step: int = 0
    history: list[dict] = field(default_factory=list)
    last_checkpoint: Path | None = None

    @property
    def out(self) -> Path:
        """The output directory."""
        return Path(self.recipe.output_dir)

    @property
    def deepspeed(self) -> bool:
        """Whether the run uses DeepSpeed."""
        return self.zero is not None

    def completed(self) -> dict[str, Any]:
        """What is done, for an error raised now: the finished stages and the last checkpoint."""
        last = None if self.last_checkpoint is None else str(self.last_checkpoint)
        return {"stages": [h["name"] for h in self.history], "last_checkpoint": last}

    def log(self, message: str) -> None:
        """Print ``message`` on the console (process 0)."""
        if self.procs.is_main:
            self.console.print(message, highlight=False, soft_wrap=True)

    def batches(self, specs, seed: tuple[int, ...], batch_size: int) -> BatchIterator:
        """This process's micro-batches of the data sources ``specs`` in the order of ``seed``."""
        data = self.recipe.data
        return make_iterator(
            specs,
            self.data,
            self.shapes,
            data.seq_len,
            data.packing,
            seed,
            batch_size,
            self.procs.rank,
            self.procs.world,
        )


@dataclass
class StageReport:
    """What one stage did (an entry of the ``--json`` report's ``stages``)."""

    name: str
    mode: str
    trainable: list[str]
    trainable_parameters: int
    steps: int
    initial_loss: float | None = None
    final_loss: float | None = None
    final_parts: dict[str, float] = field(default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0
    tokens_per_second: float = 0.0
    eval_loss: float | None = None
    skipped: dict[str, int] = field(default_factory=dict)

    def add_step(self, record: dict, seconds: float) -> None:
        """Count an optimiser step's record; adds the stage's ``tokens`` and ``elapsed`` to it."""
        self.tokens += record["step_tokens"]
        if self.initial_loss is None:
            self.initial_loss = record["loss"]
        self.final_loss = record["loss"]
        self.final_parts = {k: record[k] for k in ("mse", "kl", "ce", "mmu", "t2i") if k in record}
        self.seconds = seconds
        record["tokens"] = self.tokens
        record["elapsed"] = round(seconds, 3)

    def current(self) -> dict:
        """The part a mid-stage checkpoint keeps (to continue the report on resume)."""
        return {
            "initial_loss": self.initial_loss,
            "final_loss": self.final_loss,
            "tokens": self.tokens,
            "seconds": self.seconds,
        }

    def restore(self, current: dict) -> None:
        """Continue from :meth:`current` of a checkpoint."""
        self.initial_loss = current["initial_loss"]
        self.final_loss = current["final_loss"]
        self.tokens = current["tokens"]
        self.seconds = current["seconds"]


@dataclass
class Stage:
    """One stage being trained.

    Attributes:
        index: The stage's index in the recipe.
        spec: The stage.
        steps: Its length in optimiser steps.
        student: The student.
        model: What a micro-step calls: the objective, its DDP wrapper or its DeepSpeed engine.
        optimizer: AdamW (wrapped by DeepSpeed under DeepSpeed).
        scheduler: The learning-rate schedule.
        params: The trainable parameters, in module order.
        batches: The training batches.
        layers: The converted layers whose teacher pairs the loss needs.
        report: The stage's report so far.
        engine: The DeepSpeed engine, or ``None``.
        frozen: Under DeepSpeed, CPU copies of the weights that do not train.
        start: The first step to run (after a resumed checkpoint, its step).
    """

    index: int
    spec: StageSpec
    steps: int
    student: DecoderLM
    model: Any
    optimizer: Any
    scheduler: Any
    params: list[torch.nn.Parameter]
    batches: BatchIterator
    layers: list[int]
    report: StageReport
    engine: Any = None
    frozen: dict[str, torch.Tensor] = field(default_factory=dict)
    start: int = 0

    @property
    def logits(self) -> bool:
        """Whether the loss needs logits (an end-to-end stage)."""
        return self.spec.loss is not None and not self.spec.loss.layerwise
