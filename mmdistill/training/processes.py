"""This process's place in the run (through accelerate), barriers and reductions.

Under ``accelerate launch`` or ``torchrun`` every process runs the trainer; with one process the
collectives below are no-ops.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Processes:
    """The accelerate state of this process and the collectives the trainer needs.

    Attributes:
        accelerator: The ``accelerate.Accelerator``.
        device: This process's device.
        rank: This process's index.
        world: Number of processes.
        is_main: Whether this is process 0 (which writes the shared files and logs).
    """

    accelerator: Any
    device: torch.device
    rank: int
    world: int
    is_main: bool

    @classmethod
    def start(cls) -> Processes:
        """Set up accelerate (on the GPU when there is one, else the CPU)."""
        from accelerate import Accelerator

        accelerator = Accelerator(mixed_precision="no", cpu=not torch.cuda.is_available())
        return cls(
            accelerator=accelerator,
            device=accelerator.device,
            rank=accelerator.process_index,
            world=accelerator.num_processes,
            is_main=accelerator.is_main_process,
        )

    def barrier(self) -> None:
        """Wait for every process."""
        if self.world > 1:
            self.accelerator.wait_for_everyone()

    def main_first(self) -> AbstractContextManager:
        """A block that process 0 runs before the others (to build a cache once)."""
        return self.accelerator.main_process_first()

    def share(self, value: Any) -> Any:
        """Process 0's ``value`` (picklable), in every process."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def mean(self, values: list[float]) -> list[float]:
        """The mean of each value over the processes."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.world).tolist()

    def sum(self, value: int) -> int:
        """The sum of ``value`` over the processes."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.long, device=self.device)
        dist.all_reduce(t)
        return int(t.item())

    def all_finite(self, value: torch.Tensor | float) -> bool:
        """Whether ``value`` is finite in every process (all processes agree)."""
        value = torch.as_tensor(value, dtype=torch.float32)
        bad = torch.tensor([0.0 if bool(torch.isfinite(value)) else 1.0], device=self.device)
        if self.world > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bad.item() == 0.0
