"""Progress on stderr (process 0): a rich progress bar on a terminal, else a log line now and then."""

from __future__ import annotations

from .state import Run, Stage, StageReport


class StageProgress:
    """Shows one stage's optimiser steps; use as a context manager.

    With ``logging.progress`` on a terminal, a progress bar; otherwise a line every
    ``logging.every`` steps (and at the first and last). Only process 0 shows anything.

    Args:
        run: The run (its console, logging settings and process).
        stage: The stage (its name, length and first step).
    """

    def __init__(self, run: Run, stage: Stage):
        self.run = run
        self.name = stage.spec.name
        self.total = stage.steps
        self.start = stage.start
        self.every = run.recipe.logging.every
        self.enabled = run.procs.is_main
        self.want_bar = self.enabled and run.recipe.logging.progress and run.console.is_terminal
        self.bar = None
        self.task = None

    def __enter__(self) -> StageProgress:
        if self.want_bar:
            self.bar = _progress_bar(self.run)
            self.bar.start()
            self.task = self.bar.add_task(
                self.name, total=self.total, completed=self.start, loss="-", tps="-"
            )
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def update(self, record: dict, report: StageReport) -> None:
        """Show the step of ``record`` (its metrics record); ``report`` is the stage's so far."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(
                self.task,
                completed=record["step"],
                loss=f"{record['loss']:.4g}",
                tps=f"{record['tokens_per_s']:,.0f}",
            )
            return
        step = record["step"]
        if step == 1 or step == self.total or step % self.every == 0:
            rate = report.tokens / max(report.seconds, 1e-9)
            eta = (self.total - step) * report.seconds / max(step, 1)
            self.run.log(
                f"{self.name} step {step}/{self.total} loss {record['loss']:.5g} "
                f"{rate:,.0f} tok/s ETA {eta:.0f}s"
            )


def _progress_bar(run: Run):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=run.console,
    )
