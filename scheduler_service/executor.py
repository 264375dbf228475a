"""How the engine reaches the model: one call per step. Implemented in-process and over Ray by `cluster`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from hybrid_cache.info import WorkerInfo
from hybrid_cache.plan import BatchPlan


class ExecutorFailed(RuntimeError):
    """A step could not run (a worker died). The executor is usable again when this is raised, but
    every cache it held is gone: the engine ends the requests that were running with an error."""


class SequenceFailed(RuntimeError):
    """A step failed because of particular sequences (a value their sampling could not handle, say).

    Raise it from `execute` when the cause is known: the engine ends only the requests of `seq_ids`
    with `message` — which reaches their clients, so it must hold no internals (no paths, ids or
    tracebacks) — and preempts the rest of the step (it runs again; nothing else is lost). Any other
    exception from `execute` ends every request of the step.
    """

    def __init__(self, message: str, seq_ids: Iterable[int]) -> None:
        super().__init__(message)
        self.message = message
        self.seq_ids = tuple(seq_ids)


class Executor(Protocol):
    def info(self) -> WorkerInfo:
        """The model's limits and the cache the workers allocated."""
        ...

    def execute(self, plan: BatchPlan) -> list[int]:
        """Run one step; return one sampled token per sequence, in plan order.

        Raise ExecutorFailed when the workers lost their caches, SequenceFailed when the failure is
        traced to sequences; anything else is taken as a failure of the whole step.
        """
        ...

    def timings(self) -> dict[str, float]:
        """Cumulative seconds spent in parts of the steps (e.g. model, attention, recompute)."""
        ...

    def shutdown(self) -> None:
        """Release the workers (processes, actors, memory)."""
        ...


class Detokenizer(Protocol):
    def decode(self, token_ids: list[int]) -> str: ...
