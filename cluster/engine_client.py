"""The caller's side of a remote engine: per-request token streams over one long-poll loop.

`EngineClient` wraps a handle to a `scheduler_service.engine_service.EngineService`: a Ray actor's, or
the engine process's `EngineConnection` (`cluster/engine_process.py`), whose calls look alike. Each
`generate` returns an async iterator of RequestOutputs, like `AsyncEngine.generate`; one background
task per client polls the actor and hands every output delta to its request's stream, which rebuilds
the full output (`OutputAssembler`).

Ray attributes a remote call to the request whose asyncio context submits it and cancels the call
when that request is cancelled (a client disconnect, recursively). The poller serves every request
and an abort must outlive its request, so both submit from a fresh, empty context.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence

from cluster.errors import ReplicaFailed, RequestAborted
from hybrid_cache.plan import CacheType, SamplingParams
from scheduler_service.async_engine import outputs_from
from scheduler_service.engine import DuplicateRequestId, QueueFull
from scheduler_service.output_deltas import OutputAssembler
from scheduler_service.request import RequestOutput
from scheduler_service.stats import EngineStats

log = logging.getLogger(__name__)


class RemoteRequestError(ReplicaFailed):
    """The engine ended a request's stream with an error (e.g. its engine loop stopped)."""


# A request refused by the engine thread after `add_request` returned (a race with a full queue, say), or
# aborted by another caller, comes back as "<exception name>: <message>": these names map to what the
# stream raises; any other is a failure of the replica.
_REFUSALS: dict[str, type[Exception]] = {"QueueFull": QueueFull, "ValueError": ValueError,
                                         "HiddenCacheUnavailable": ValueError, "RequestAborted": RequestAborted,
                                         "DuplicateRequestId": DuplicateRequestId}


def _stream_error(message: str) -> Exception:
    name, _, rest = message.partition(": ")
    refusal = _REFUSALS.get(name)
    return refusal(rest) if refusal is not None else RemoteRequestError(message)


class EngineClient:
    def __init__(  # noqa: ANN001 - `handle` is a Ray actor handle
        self, handle, poll_timeout_s: float = 1.0, call_timeout_s: float = 5.0,
        restart: Callable[[], None] | None = None,
    ) -> None:
        self.handle = handle
        self._restart = restart  # restarts the actor (`cluster/ray_cluster.py`); None: it cannot be restarted
        self.caller = uuid.uuid4().hex
        self.poll_timeout_s = poll_timeout_s
        self.call_timeout_s = call_timeout_s  # stats and health calls: a restarting actor would hold them
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
        received_at: float | None = None,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Queue the request remotely (bad input raises here, as the engine's own error) and stream it.
        `received_at`: when the ingress received it (`time.time()`), where its TTFT starts."""
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        try:
            when = {} if received_at is None else {"received_at": received_at}  # else the engine's own clock
            if priority:  # sent only when set: the default is the engine's own
                when["priority"] = priority
            await self.handle.add_request.remote(
                self.caller, request_id, list(prompt_token_ids), params, cache_type, ttft_slo_s, tbt_slo_s, **when
            )
        except asyncio.CancelledError:  # the caller left mid-submit: the actor may have queued it already
            self._streams.pop(request_id, None)
            self._abort_soon(request_id)  # the engine drops an abort that comes before its request too
            raise
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        if self._poller is None or self._poller.done():
            loop = asyncio.get_running_loop()
            self._poller = loop.create_task(self._poll(), context=contextvars.Context())
        return self._outputs(request_id, queue, OutputAssembler(list(prompt_token_ids)))

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
                    item = _stream_error(message)
                else:
                    request_id = item.request_id
                queue = self._streams.get(request_id)
                if queue is not None:
                    queue.put_nowait(item)

    async def _outputs(
        self, request_id: str, queue: asyncio.Queue, outputs: OutputAssembler
    ) -> AsyncIterator[RequestOutput]:
        try:
            async for delta in outputs_from(queue, abandoned=lambda: self._abort_soon(request_id)):
                yield outputs.assemble(delta)
        finally:
            self._streams.pop(request_id, None)

    def abandon(self, request_id: str) -> None:
        """Forget a stream its consumer dropped (perhaps before reading it) and abort its request."""
        self._streams.pop(request_id, None)
        self._abort_soon(request_id)

    def _abort_soon(self, request_id: str) -> None:
        """Submit the abort without waiting: its stream is being closed, perhaps by cancellation."""
        contextvars.Context().run(self.handle.abort.remote, request_id)

    async def abort(self, request_id: str, reason: str = "client") -> None:
        """Abort the request in the engine; its open stream here ends with `RequestAborted`."""
        queue = self._streams.get(request_id)
        if queue is not None:
            queue.put_nowait(RequestAborted(f"request {request_id!r} was aborted"))
        await self.handle.abort.remote(request_id, reason)

    async def stats(self) -> EngineStats:
        return await asyncio.wait_for(self.handle.stats.remote(), self.call_timeout_s)

    async def health(self) -> bool:
        return await asyncio.wait_for(self.handle.health.remote(), self.call_timeout_s)

    def restart(self) -> None:
        """Have the actor restarted (its constructor builds a new engine); its streams here end."""
        if self._restart is None:
            log.warning("this engine replica cannot be restarted from here")
            return
        self._restart()
