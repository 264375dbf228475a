"""The caller's side of a remote engine: per-request token streams over one long-poll loop.

`EngineClient` wraps a Ray actor hosting `scheduler_service.engine_service.EngineService`. Each
`generate` returns an async iterator of RequestOutputs, like `AsyncEngine.generate`; one background
task per client polls the actor and hands every output to its request's stream.

Ray attributes a remote call to the request whose asyncio context submits it and cancels the call
when that request is cancelled (a client disconnect, recursively). The poller serves every request
and an abort must outlive its request, so both submit from a fresh, empty context.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import uuid
from collections.abc import AsyncIterator, Sequence

from hybrid_cache.plan import CacheType, SamplingParams
from scheduler_service.async_engine import outputs_from
from scheduler_service.engine import EngineStats
from scheduler_service.request import RequestOutput

log = logging.getLogger(__name__)


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
            loop = asyncio.get_running_loop()
            self._poller = loop.create_task(self._poll(), context=contextvars.Context())
        return self._outputs(request_id, queue)

    async def _poll(self) -> None:
        while self._streams:
            try:
                items = await self.handle.poll.remote(self.caller, self.poll_timeout_s)
            except Exception as err:  # noqa: BLE001 - no stream may wait on a poller that stopped
                log.warning("polling the engine replica failed; ending %d streams: %r", len(self._streams), err)
                for request_id, queue in self._streams.items():
                    queue.put_nowait(RemoteRequestError(f"lost the engine replica's outputs: {err}"))
                    self._abort_soon(request_id)
                return  # the next request starts a new poller
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
            async for output in outputs_from(queue, abandoned=lambda: self._abort_soon(request_id)):
                yield output
        finally:
            self._streams.pop(request_id, None)

    def _abort_soon(self, request_id: str) -> None:
        """Submit the abort without waiting: its stream is being closed, perhaps by cancellation."""
        contextvars.Context().run(self.handle.abort.remote, request_id)

    async def abort(self, request_id: str) -> None:
        await self.handle.abort.remote(request_id)

    async def stats(self) -> EngineStats:
        return await self.handle.stats.remote()

    async def health(self) -> bool:
        return await self.handle.health.remote()
