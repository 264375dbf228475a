"""The in-process executor: the model runner lives in this process (TP=1; tests, offline `LLM`)."""

from __future__ import annotations

from hybrid_cache.config import CacheConfig
from hybrid_cache.info import WorkerInfo
from hybrid_cache.plan import BatchPlan
from worker.config import ModelConfig
from worker.model_runner import ModelRunner


class LocalExecutor:
    """Implements `scheduler_service.Executor` with a `ModelRunner` in this process."""

    def __init__(self, model: ModelConfig, cache: CacheConfig) -> None:
        self.runner = ModelRunner(model, cache)

    def info(self) -> WorkerInfo:
        return self.runner.info()

    def execute(self, plan: BatchPlan) -> list[int]:
        return self.runner.execute(plan).token_ids

    def timings(self) -> dict[str, float]:
        return self.runner.timings()

    def describe(self) -> dict[str, object]:
        """The attention backend and GEMM path in use (as the Ray ranks' `describe`)."""
        return self.runner.describe()

    def shutdown(self) -> None:
        pass  # the runner is freed with this object
