"""Cumulative wall time of the parts of a step (model, attention, recompute, scheduling)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager


class StepTimer:
    """Adds the wall time of each measured block to a named total.

    Host wall time: exact on the CPU, where every op has finished when it returns; on a GPU it counts
    launch time unless the caller synchronises. `counts` holds how many blocks each total covers, so
    a test can check that every call of a part was measured.
    """

    def __init__(self) -> None:
        self.totals: defaultdict[str, float] = defaultdict(float)
        self.counts: defaultdict[str, int] = defaultdict(int)

    @contextmanager
    def measure(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] += time.perf_counter() - start
            self.counts[name] += 1

    def reset(self) -> None:
        """Forget every total (start-up profiling is not serving time)."""
        self.totals.clear()
        self.counts.clear()
