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
from scheduler_service.step_time import StepTimePredictor


@dataclass
class SchedulerView:
    """What a policy may look at: the queues in order, the cache accounting and the step limits."""

    waiting: Sequence[Request]  # oldest first; preempted requests go back to the front (see `by_priority`)
    running: Sequence[Request]  # in admission order
    cache: CacheManager
    config: SchedulerConfig
    max_num_batched_tokens: int
    alpha: float  # seconds of recompute per block of hidden history per step
    now: float
    step_time: StepTimePredictor | None = None  # None: no step-time profile (chunks sized by tokens alone)

    @property
    def cache_mode(self) -> CacheMode:
        return self.config.cache_mode

    def allowed_types(self, request: Request) -> list[CacheType]:
        """Cache types `request` may use, preferred first."""
        return allowed_cache_types(request.cache_override, self.cache_mode, self.cache.layout)


def by_priority(requests: Sequence[Request]) -> list[Request]:
    """`requests` in order of vLLM's `priority` (lower first), keeping their order within a priority
    (arrival order, preempted requests first, as the queues hold them)."""
    if not any(r.priority for r in requests):
        return list(requests)  # the common case: nothing to reorder
    return sorted(requests, key=lambda r: r.priority)


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
    """One step's choice. `decode` holds running requests that go on — a decode, or the next chunk of
    a prompt they are prefilling — with the cache type to continue with: KV for a hidden request
    means converting it in place. `prefill` admits waiting requests. Requests in `preempt` lose
    their blocks and wait again; a running request in neither list keeps its blocks and sits out.

    `num_new_tokens` (by seq_id) cuts a prompt: the step computes that many of the request's
    `num_new_tokens` (at least 1, at most all); a request not named computes all it has left.
    """

    decode: list[tuple[Request, CacheType]] = field(default_factory=list)
    prefill: list[tuple[Request, CacheType]] = field(default_factory=list)
    preempt: list[Request] = field(default_factory=list)
    num_new_tokens: dict[int, int] = field(default_factory=dict)

    def tokens_for(self, request: Request) -> int:
        """Tokens `request` computes in this step."""
        return self.num_new_tokens.get(request.seq_id, request.num_new_tokens)

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.tokens_for(r) for r, _ in self.decode) + sum(self.tokens_for(r) for r, _ in self.prefill)


class Policy(ABC):
    """Chooses the batch of each step. Must return a decision that fits in the cache."""

    name: str

    @abstractmethod
    def schedule(self, view: SchedulerView) -> ScheduleDecision: ...
