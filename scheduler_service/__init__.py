"""Requests and their lifecycle, scheduling policies, and the engine loop (no model code here)."""

from scheduler_service.config import SchedulerConfig
from scheduler_service.engine import Engine, QueueFull
from scheduler_service.executor import Detokenizer, Executor
from scheduler_service.knapsack import CacheOption, choose_cache_types
from scheduler_service.request import FinishReason, Request, RequestOutput, RequestStatus
from scheduler_service.stats import EngineStats

__all__ = [
    "CacheOption",
    "Detokenizer",
    "Engine",
    "EngineStats",
    "Executor",
    "FinishReason",
    "QueueFull",
    "Request",
    "RequestOutput",
    "RequestStatus",
    "SchedulerConfig",
    "choose_cache_types",
]
