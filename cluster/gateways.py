"""What the HTTP and gRPC front ends talk to: one engine in this process, or engine replicas on Ray
(`cluster/router.py`).

Both give the same async face: `generate` (validate and queue, then a `RequestStream` of outputs),
`abort`, `health` (each replica's state) and `replica_stats` (for /metrics; None for a replica that does
not answer, `healthy` False in the stats of one whose engine loop stopped).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from cluster.errors import DuplicateRequestId
from cluster.streams import RequestStream
from hybrid_cache.plan import CacheType, SamplingParams
from scheduler_service.async_engine import AsyncEngine
from scheduler_service.stats import EngineStats

UP, DOWN = "up", "down"  # a replica's state as /health and /metrics report it


class Gateway(Protocol):
    max_model_len: int
    vocab_size: int
    num_replicas: int

    async def generate(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        request_id: str,
        cache_type: CacheType | str | None = None,
        ttft_slo_s: float | None = None,
        tbt_slo_s: float | None = None,
        received_at: float | None = None,
        priority: int = 0,
    ) -> RequestStream: ...

    async def abort(self, request_id: str, reason: str = "client") -> None: ...

    async def health(self) -> dict[str, str]: ...

    async def replica_stats(self) -> list[tuple[str, EngineStats | None]]: ...


def serving(states: dict[str, str]) -> bool:
    """The service answers requests: at least one replica is up."""
    return UP in states.values()


def service_status(states: dict[str, str]) -> str:
    """What /health and gRPC Health report: ok (every replica up), degraded (some), unavailable (none)."""
    if not serving(states):
        return "unavailable"
    return "ok" if all(state == UP for state in states.values()) else "degraded"


class LocalGateway:
    """One `AsyncEngine` in this process: the HTTP routes under uvicorn, without Ray (the tests)."""

    num_replicas = 1

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.max_model_len = engine.engine.info.max_model_len
        self.vocab_size = engine.engine.info.vocab_size
        self._live: set[str] = set()

    async def generate(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        request_id: str,
        cache_type: CacheType | str | None = None,
        ttft_slo_s: float | None = None,
        tbt_slo_s: float | None = None,
        received_at: float | None = None,
        priority: int = 0,
    ) -> RequestStream:
        if request_id in self._live:
            raise DuplicateRequestId(f"request id {request_id!r} is already in use")
        stream = self.engine.generate(prompt_token_ids, params, request_id, cache_type, ttft_slo_s, tbt_slo_s,
                                      received_at=received_at, priority=priority)
        self._live.add(request_id)
        return RequestStream(stream, abandon=lambda: self.engine.abort(request_id),
                             closed=lambda _: self._live.discard(request_id))

    async def abort(self, request_id: str, reason: str = "client") -> None:
        self.engine.abort(request_id, reason)

    async def health(self) -> dict[str, str]:
        return {"0": UP if self.engine.healthy else DOWN}

    async def replica_stats(self) -> list[tuple[str, EngineStats | None]]:
        return [("0", await asyncio.to_thread(self.engine.stats))]  # it waits for the step in progress
