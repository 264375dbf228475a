"""The engine loop on its own thread, with an asyncio face: many concurrent streams, one loop.

The loop steps while there is work and sleeps when there is none; it never waits for a client.
Callers never wait for a step either: new requests and aborts go into an inbox that the loop drains
between steps, and each step's outputs reach each request's asyncio queue in one hop.

A failed step costs the requests it touched, never the loop (`Engine.step` ends them with an error);
the loop stops only on `shutdown()`, or if recovering from a failure itself fails — then `healthy` is
False, `stats().healthy` says so, and every stream ends with EngineDeadError.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from hybrid_cache.plan import CacheType, SamplingParams
from scheduler_service.engine import DuplicateRequestId, Engine, QueueFull
from scheduler_service.request import RequestOutput
from scheduler_service.stats import EngineStats

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop stopped (shut down, or failed beyond recovery); in-flight requests end with it."""


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
    arrival_time: float  # engine clock at the ingress's receipt (or at `generate`), not at the next step
    priority: int = 0  # vLLM's: lower runs first


@dataclass
class _Abort:
    request_id: str
    reason: str


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


class RequestStream:
    """One request's outputs as an async iterator, ending with the finished one (an exception put in
    the queue is raised). However it is abandoned before its end — `aclose()`, a cancelled `__anext__`,
    or dropped unread (a client gone before the body started) and garbage-collected — the request is
    aborted exactly once, so its blocks are freed."""

    def __init__(self, request_id: str, queue: asyncio.Queue, abort: Callable[[str], None]) -> None:
        self.request_id = request_id
        self._queue = queue
        self._done = False
        # A finalizer, not __del__: it holds no reference to the stream, runs once, and can be detached.
        self._abort = weakref.finalize(self, abort, request_id)
        self._abort.atexit = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except BaseException:  # cancelled while waiting: the consumer is gone
            self._abandon()
            raise
        if isinstance(item, BaseException):
            self._end()
            raise item
        if item.finished:
            self._end()
        return item

    async def aclose(self) -> None:
        self._abandon()

    def _end(self) -> None:
        self._done = True
        self._abort.detach()

    def _abandon(self) -> None:
        self._done = True
        self._abort()  # a no-op once it has run or was detached


class AsyncEngine:
    """Drives an `Engine` from a background thread; only that thread touches the engine's state
    (`stats()` reads it while the thread is between steps)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._cond = threading.Condition()
        self._state_lock = threading.Lock()  # held by the loop while it changes the engine's state
        self._inbox: list[_Add | _Abort] = []
        self._streams: dict[str, _Stream] = {}
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
                outputs = self._iterate(inbox)
            except BaseException as err:  # noqa: BLE001 - recovery failed (or an interrupt): streams must learn
                log.critical("the engine loop stopped: recovering from a failed step failed", exc_info=True)
                self._error = err
                self._fail_all(err)
                return
            for output in outputs:
                self._send(output.request_id, output, last=output.finished)

    def _iterate(self, inbox: list[_Add | _Abort]) -> list[RequestOutput]:
        """Apply the inbox and run one step. `Engine.step` does not raise for a failed step; if
        anything else here does, every request in flight ends with an error and the loop goes on."""
        with self._state_lock:
            try:
                for item in inbox:
                    self._apply(item)
                return self.engine.step() if self.engine.has_unfinished() else []
            except Exception as err:  # noqa: BLE001 - a bug outside the step's guarded parts
                log.exception("the engine loop failed outside a step's guarded parts")
                return self.engine.recover(err)

    def _apply(self, item: _Add | _Abort) -> None:
        if isinstance(item, _Abort):
            self.engine.abort(item.request_id, item.reason)
            return
        try:
            self.engine.add_request(
                item.prompt, item.params, request_id=item.request_id, cache_type=item.cache_type,
                ttft_slo_s=item.ttft_slo_s, tbt_slo_s=item.tbt_slo_s, arrival_time=item.arrival_time,
                priority=item.priority,
            )
        except (ValueError, QueueFull) as err:  # checked by `generate` already; only a race gets here
            self._send(item.request_id, err, last=True)
        except Exception:  # noqa: BLE001 - traced to this request: it alone fails
            log.exception("could not queue %s", item.request_id)
            self._send(item.request_id, RuntimeError("the engine could not queue the request"), last=True)

    def _send(self, request_id: str, item: object, last: bool) -> None:
        with self._cond:
            stream = self._streams.pop(request_id, None) if last else self._streams.get(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _fail_all(self, err: BaseException) -> None:
        with self._cond:
            streams, self._streams = list(self._streams.values()), {}
        dead = EngineDeadError(f"the engine loop stopped ({type(err).__name__})")
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
        *,
        received_at: float | None = None,
        priority: int = 0,
    ) -> RequestStream:
        """Queue a request now and return its stream of outputs (call from a running event loop).

        Bad input raises ValueError here, and a full waiting queue QueueFull, before anything is
        queued (each counted once in `num_rejected`). The stream yields an output after every step
        that gave the request a token; the last one is finished. If the caller stops iterating, or
        never starts (a client went away), the request is aborted and its blocks are freed.
        `received_at` is the wall-clock time (`time.time()`) at which the ingress received the
        request: waiting and TTFT count from it. `priority`: vLLM's, lower runs first (`Engine.add_request`).
        """
        try:
            prompt, override = self.engine.validate(prompt_token_ids, params, cache_type, ttft_slo_s, tbt_slo_s)
        except ValueError:
            self.engine.count_rejection("invalid")
            raise
        arrival = self.engine.arrival_from_wall(received_at)
        queue: asyncio.Queue = asyncio.Queue()
        with self._cond:
            if self._error is not None or self._stopped:
                raise EngineDeadError("the engine loop is not running")
            self.engine.check_capacity(queued_elsewhere=sum(isinstance(item, _Add) for item in self._inbox))
            if request_id in self._streams:
                raise DuplicateRequestId(f"request id {request_id!r} is already in use")
            self._streams[request_id] = _Stream(asyncio.get_running_loop(), queue)
            self._inbox.append(_Add(request_id, prompt, params, override, ttft_slo_s, tbt_slo_s, arrival, priority))
            self._cond.notify()
        return RequestStream(request_id, queue, self.abort)

    def abort(self, request_id: str, reason: str = "client") -> None:
        """Abort a request (no-op if it already ended); its stream gets no more outputs. Thread-safe.

        `reason`: "client" (the caller went away or asked), "timeout" or "server" (see ABORT_REASONS).
        """
        with self._cond:
            self._streams.pop(request_id, None)
            self._inbox.append(_Abort(request_id, reason))
            self._cond.notify()

    def stats(self) -> EngineStats:
        """The engine's statistics now, with `healthy` telling whether the loop runs.

        Built on request (the loop no longer copies them after every step): waits for the step in
        progress, if any, to end. From asyncio code, call it in a thread (`asyncio.to_thread`).
        """
        with self._state_lock:
            return self.engine.stats(healthy=self.healthy)

    @property
    def healthy(self) -> bool:
        return self._error is None and not self._stopped and self._thread.is_alive()

    def shutdown(self) -> None:
        """Stop the loop, then the model workers; open streams end with EngineDeadError."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=30)
        self._fail_all(EngineDeadError("the engine was shut down"))
        self.engine.executor.shutdown()
