"""The metrics of every optimiser step: ``metrics.jsonl`` and TensorBoard scalars (process 0)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ..files import atomic_write_text

METRICS_FILE = "metrics.jsonl"
SCALARS = ("loss", "mse", "kl", "ce", "lr", "grad_norm", "tokens_per_s")


class MetricsLog:
    """Appends one record per optimiser step to ``metrics.jsonl`` and TensorBoard.

    Other processes than process 0 write nothing.

    Args:
        out: The run's output directory.
        enabled: Whether this process writes (process 0).
    """

    def __init__(self, out: Path, enabled: bool):
        self.path = Path(out) / METRICS_FILE
        self.tensorboard_dir = Path(out) / "tensorboard"
        self.enabled = enabled
        self.tb = None

    def open_tensorboard(self, log: Callable[[str], None]) -> None:
        """Start the TensorBoard writer (``log`` says so if TensorBoard is not installed)."""
        if not self.enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log("[yellow]tensorboard is not installed; writing metrics.jsonl only[/]")
            return
        self.tb = SummaryWriter(str(self.tensorboard_dir))

    def write(self, record: dict) -> None:
        """Append one step's record (``stage``, ``global_step`` and the scalars present)."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key in SCALARS:
                if record.get(key) is not None:
                    self.tb.add_scalar(
                        f"{record['stage']}/{key}", record[key], record["global_step"]
                    )

    def trim(self, stage_index: int, step: int) -> None:
        """Drop the lines written after step ``step`` of stage ``stage_index`` (on resume)."""
        if not self.enabled or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if (record["stage_index"], record["step"]) <= (stage_index, step):
                keep.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))

    def close(self) -> None:
        """Flush and close TensorBoard."""
        if self.tb is not None:
            self.tb.close()
