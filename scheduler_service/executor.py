"""How the engine reaches the model: one call per step. Implemented in-process and over Ray by `cluster`."""

from __future__ import annotations

from typing import Protocol

from hybrid_cache.info import WorkerInfo
from hybrid_cache.plan import BatchPlan


class ExecutorFailed(RuntimeError):
    """A step could not run (a worker died). The executor is usable again when this is raised, but
    every cache it held is gone: the engine ends the requests that were running with an error."""


class Executor(Protocol):
    def info(self) -> WorkerInfo:
        """The model's limits and the cache the workers allocated."""
        ...

    def execute(self, plan: BatchPlan) -> list[int]:
        """Run one step; return one sampled token per sequence, in plan order (or raise ExecutorFailed)."""
        ...

    def timings(self) -> dict[str, float]:
        """Cumulative seconds spent in parts of the steps (e.g. model, attention, recompute)."""
        ...

    def shutdown(self) -> None:
        """Release the workers (processes, actors, memory)."""
        ...


class Detokenizer(Protocol):
    def decode(self, token_ids: list[int]) -> str: ...
