"""The interface every scheduling policy implements, and the plain data it reads and returns."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from hybrid_cache.layout import CacheLayout
from hybrid_cache.manager import CacheManager
from hybrid_cache.plan import CacheType
from scheduler_service.config import CacheMode, SchedulerConfig
from scheduler_service.request import Request


@dataclass
class SchedulerView:
    """What a policy may look at: the queues in order, the cache accounting and the step limits."""

    waiting: Sequence[Request]  # oldest first; preempted requests go back to the front
    running: Sequence[Request]  # in admission order
    cache: CacheManager
    config: SchedulerConfig
    max_num_batched_tokens: int
    alpha: float  # seconds of recompute per block of hidden history per step
    now: float

    @property
    def cache_mode(self) -> CacheMode:
        return self.config.cache_mode

    def allowed_types(self, request: Request) -> list[CacheType]:
        """Cache types `request` may use, preferred first."""
        return allowed_cache_types(request.cache_override, self.cache_mode, self.cache.layout)


def allowed_cache_types(override: CacheType | None, mode: CacheMode, layout: CacheLayout) -> list[CacheType]:
    """The per-request override if any, else what the cache mode allows; KV first."""
    if override is not None:
        return [override]
    if mode == "kv" or not layout.hidden_allowed:
        return [CacheType.KV]
    if mode == "hidden":
        return [CacheType.HIDDEN]
    return [CacheType.KV, CacheType.HIDDEN]


@dataclass
class ScheduleDecision:
    """One step's choice. `decode` entries name the cache type to continue with: KV for a hidden
    request means converting it in place. Requests in `preempt` lose their blocks and wait again."""

    decode: list[tuple[Request, CacheType]] = field(default_factory=list)
    prefill: list[tuple[Request, CacheType]] = field(default_factory=list)
    preempt: list[Request] = field(default_factory=list)


class Policy(ABC):
    """Chooses the batch of each step. Must return a decision that fits in the cache."""

    name: str

    @abstractmethod
    def schedule(self, view: SchedulerView) -> ScheduleDecision: ...
