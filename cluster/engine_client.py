"""The caller's side of a remote engine: per-request token streams over one long-poll loop.

`EngineClient` wraps a Ray actor hosting `scheduler_service.engine_service.EngineService`. Each
`generate` returns an async iterator of RequestOutputs, like `AsyncEngine.generate`; one background
task per client polls the actor and hands every output to its request's stream.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence

from hybrid_cache.plan import CacheType, SamplingParams
from scheduler_service.async_engine import outputs_from
from scheduler_service.engine import EngineStats
from scheduler_service.request import RequestOutput


class RemoteRequestError(RuntimeError):
    """The engine ended a request's stream with an error (e.g. its engine loop stopped)."""


class EngineClient:
    def __init__(self, handle, poll_timeout_s: float = 1.0) -> None:  # noqa: ANN001 - a Ray actor handle
        self.handle = handle
        self.caller = uuid.uuid4().hex
        self.poll_timeout_s = poll_timeout_s
        self._streams: dict[str, asyncio.Queue] = {}
        self._poller: asyncio.Task | None = None

    async def generate(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        request_id: str,
        cache_type: CacheType | str | None = None,
        ttft_slo_s: float | None = None,
        tbt_slo_s: float | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Queue the request remotely (bad input raises here, as the engine's own error) and stream it."""
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        try:
            await self.handle.add_request.remote(
                self.caller, request_id, list(prompt_token_ids), params, cache_type, ttft_slo_s, tbt_slo_s
            )
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll())
        return self._outputs(request_id, queue)

    async def _poll(self) -> None:
        while self._streams:
            items = await self.handle.poll.remote(self.caller, self.poll_timeout_s)
            for item in items:
                if isinstance(item, tuple):
                    request_id, message = item
                    item = RemoteRequestError(message)
                else:
                    request_id = item.request_id
                queue = self._streams.get(request_id)
                if queue is not None:
                    queue.put_nowait(item)

    async def _outputs(self, request_id: str, queue: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        try:
            async for output in outputs_from(queue, abandoned=lambda: self.handle.abort.remote(request_id)):
                yield output
        finally:
            self._streams.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        await self.handle.abort.remote(request_id)

    async def stats(self) -> EngineStats:
        return await self.handle.stats.remote()

    async def health(self) -> bool:
        return await self.handle.health.remote()
