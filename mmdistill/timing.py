"""Timing GPU and CPU work: CUDA events on CUDA (what the device did, without host overhead),
the wall clock elsewhere. Every timer of the package and its benchmarks is one of these."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


class Timer:
    """Milliseconds between :meth:`start` and :meth:`stop_ms` on ``device``."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._stop = torch.cuda.Event(enable_timing=True)

    def start(self) -> None:
        if self.cuda:
            self._start.record()
        else:
            self._t0 = time.perf_counter()

    def stop_ms(self) -> float:
        """Milliseconds since :meth:`start` (waits for the device on CUDA)."""
        if self.cuda:
            self._stop.record()
            self._stop.synchronize()
            return self._start.elapsed_time(self._stop)
        return (time.perf_counter() - self._t0) * 1e3


def mean_ms(fn: Callable[[], object], device: torch.device | str, reps: int = 1) -> float:
    """Mean milliseconds per call over ``reps`` back-to-back calls of ``fn`` in one window."""
    timer = Timer(device)
    timer.start()
    for _ in range(reps):
        fn()
    return timer.stop_ms() / reps


def median_ms(
    fn: Callable[[], object], device: torch.device | str, budget_ms: float = 400
) -> float:
    """Median milliseconds of single calls of ``fn`` after warm-up; repetitions fit the budget."""
    first = min(mean_ms(fn, device), mean_ms(fn, device))
    reps = int(max(3, min(50, budget_ms / max(first, 1e-3))))
    return statistics.median(mean_ms(fn, device) for _ in range(reps))
