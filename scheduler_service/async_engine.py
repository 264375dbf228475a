"""The engine loop on its own thread, with an asyncio face: many concurrent streams, one loop.

The loop steps while there is work and sleeps when there is none; it never waits for a client.
Callers never wait for a step either: new requests and aborts go into an inbox that the loop drains
between steps, and each step's outputs reach each request's asyncio queue in one hop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from hybrid_cache.plan import CacheType, SamplingParams
from scheduler_service.engine import Engine, EngineStats, QueueFull
from scheduler_service.request import RequestOutput

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an error; in-flight requests end with it."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


@dataclass
class _Add:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    cache_type: CacheType | None
    ttft_slo_s: float | None
    tbt_slo_s: float | None
    arrival_time: float  # engine clock at `generate`: waiting counts from the call, not from the next step


async def outputs_from(queue: asyncio.Queue, abandoned: Callable[[], None]) -> AsyncIterator[RequestOutput]:
    """A request's stream: outputs from `queue` until the finished one; an exception in the queue is
    raised. If the consumer stops early, `abandoned()` is called: synchronously, because a consumer
    that stops on cancellation may not await anything more."""
    finished = False
    try:
        while not finished:
            item = await queue.get()
            if isinstance(item, BaseException):
                finished = True
                raise item
            finished = item.finished
            yield item
    finally:
        if not finished:
            abandoned()


class AsyncEngine:
    """Drives an `Engine` from a background thread; only that thread touches the engine's state."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._cond = threading.Condition()
        self._inbox: list[_Add | str] = []  # new requests, or request ids to abort
        self._streams: dict[str, _Stream] = {}
        self._stats: EngineStats = engine.stats()
        self._stopped = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="aptserve-engine-loop", daemon=True)
        self._thread.start()

    # -- the loop ------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and not self._inbox and not self.engine.has_unfinished():
                    self._cond.wait()
                if self._stopped:
                    return
                inbox, self._inbox = self._inbox, []
            try:
                for item in inbox:
                    self._apply(item)
                outputs = self.engine.step() if self.engine.has_unfinished() else []
                self._stats = self.engine.stats()
            except BaseException as err:  # noqa: BLE001 - every stream must learn that the loop died
                log.exception("engine step failed")
                self._error = err
                self._fail_all(err)
                return
            for output in outputs:
                self._send(output.request_id, output, last=output.finished)

    def _apply(self, item: _Add | str) -> None:
        if isinstance(item, str):
            self.engine.abort(item)
            return
        try:
            self.engine.add_request(
                item.prompt, item.params, request_id=item.request_id, cache_type=item.cache_type,
                ttft_slo_s=item.ttft_slo_s, tbt_slo_s=item.tbt_slo_s, arrival_time=item.arrival_time,
            )
        except (ValueError, QueueFull) as err:  # checked by `generate` already; only a race gets here
            self._send(item.request_id, err, last=True)

    def _send(self, request_id: str, item: object, last: bool) -> None:
        with self._cond:
            stream = self._streams.pop(request_id, None) if last else self._streams.get(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _fail_all(self, err: BaseException) -> None:
        with self._cond:
            streams, self._streams = list(self._streams.values()), {}
        dead = EngineDeadError(f"the engine loop stopped: {err}")
        for stream in streams:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, dead)

    # -- requests ------------------------------------------------------------------------------
    def generate(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        request_id: str,
        cache_type: CacheType | str | None = None,
        ttft_slo_s: float | None = None,
        tbt_slo_s: float | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Queue a request now and return its stream of outputs (call from a running event loop).

        Bad input raises ValueError here, and a full waiting queue QueueFull, before anything is
        queued. The stream yields an output after every step that gave the request a token; the last
        one is finished. If the caller
        stops iterating (a client went away), the request is aborted and its blocks are freed.
        """
        try:
            prompt, override = self.engine.validate(prompt_token_ids, params, cache_type, ttft_slo_s, tbt_slo_s)
        except ValueError:
            self.engine.num_rejected["invalid"] += 1
            raise
        queue: asyncio.Queue = asyncio.Queue()
        with self._cond:
            if self._error is not None or self._stopped:
                raise EngineDeadError("the engine loop is not running")
            self.engine.check_capacity(queued_elsewhere=sum(isinstance(item, _Add) for item in self._inbox))
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = _Stream(asyncio.get_running_loop(), queue)
            self._inbox.append(_Add(request_id, prompt, params, override, ttft_slo_s, tbt_slo_s, self.engine.clock()))
            self._cond.notify()
        return self._outputs(request_id, queue)

    async def _outputs(self, request_id: str, queue: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        async for output in outputs_from(queue, abandoned=lambda: self.abort(request_id)):
            yield output

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op if it already ended); its stream gets no more outputs."""
        with self._cond:
            self._streams.pop(request_id, None)
            self._inbox.append(request_id)
            self._cond.notify()

    def stats(self) -> EngineStats:
        """The engine's statistics as of its last step (read without waiting for the loop)."""
        return self._stats

    @property
    def healthy(self) -> bool:
        return self._error is None and not self._stopped and self._thread.is_alive()

    def shutdown(self) -> None:
        """Stop the loop, then the model workers."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=30)
        self.engine.executor.shutdown()
