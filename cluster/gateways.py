"""What the HTTP and gRPC front ends talk to: one engine in this process, or engine replicas on Ray.

Both give the same async face: `generate` (validate and queue, then stream outputs), `abort`,
`healthy` and `replica_stats` (for /metrics).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from cluster.engine_client import EngineClient, RemoteRequestError
from hybrid_cache.plan import CacheType, SamplingParams
from scheduler_service.async_engine import AsyncEngine, EngineDeadError
from scheduler_service.engine import EngineStats
from scheduler_service.request import RequestOutput

# What a gateway's stream raises when the engine under it failed (its loop, or the replica actor):
# the front ends answer it with HTTP 503 or gRPC UNAVAILABLE.
ENGINE_FAILURES = (EngineDeadError, RemoteRequestError)


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
    ) -> AsyncIterator[RequestOutput]: ...

    async def abort(self, request_id: str) -> None: ...

    async def healthy(self) -> bool: ...

    async def replica_stats(self) -> list[tuple[str, EngineStats]]: ...


class LocalGateway:
    """One `AsyncEngine` in this process: the HTTP routes under uvicorn, without Ray (the tests)."""

    num_replicas = 1

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.max_model_len = engine.engine.info.max_model_len
        self.vocab_size = engine.engine.info.vocab_size

    async def generate(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        request_id: str,
        cache_type: CacheType | str | None = None,
        ttft_slo_s: float | None = None,
        tbt_slo_s: float | None = None,
    ) -> AsyncIterator[RequestOutput]:
        return self.engine.generate(prompt_token_ids, params, request_id, cache_type, ttft_slo_s, tbt_slo_s)

    async def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    async def healthy(self) -> bool:
        return self.engine.healthy

    async def replica_stats(self) -> list[tuple[str, EngineStats]]:
        return [("0", self.engine.stats())]


class ReplicaRouter:
    """Engine replicas (scheduler actors) behind one face: each request goes to the replica with the
    fewest of this router's requests in flight; ties go to the lowest index."""

    def __init__(self, clients: list[EngineClient], max_model_len: int, vocab_size: int) -> None:
        if not clients:
            raise ValueError("a router needs at least one engine replica")
        self.clients = clients
        self.max_model_len, self.vocab_size = max_model_len, vocab_size
        self.num_replicas = len(clients)
        self._in_flight = [0] * len(clients)
        self._owner: dict[str, int] = {}

    async def generate(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        request_id: str,
        cache_type: CacheType | str | None = None,
        ttft_slo_s: float | None = None,
        tbt_slo_s: float | None = None,
    ) -> AsyncIterator[RequestOutput]:
        index = min(range(len(self.clients)), key=self._in_flight.__getitem__)
        stream = await self.clients[index].generate(
            prompt_token_ids, params, request_id, cache_type, ttft_slo_s, tbt_slo_s
        )
        self._in_flight[index] += 1
        self._owner[request_id] = index
        return self._counted(request_id, index, stream)

    async def _counted(self, request_id: str, index: int, stream: AsyncIterator[RequestOutput]):  # noqa: ANN202
        try:
            async for output in stream:
                yield output
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
            self._in_flight[index] -= 1
            self._owner.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        index = self._owner.get(request_id)
        if index is not None:
            await self.clients[index].abort(request_id)

    async def healthy(self) -> bool:
        return all([await client.health() for client in self.clients])

    async def replica_stats(self) -> list[tuple[str, EngineStats]]:
        return [(str(i), await client.stats()) for i, client in enumerate(self.clients)]
