"""The central scheduler as a service: an engine loop that many callers reach through four calls.

`EngineService` is plain asyncio (no Ray import): `cluster` hosts it in a Ray actor that reserves no
CPU, and tests can drive it directly. Callers add requests and then long-poll for outputs: one
`poll` returns every output the engine produced for that caller since the last poll, so outputs leave
the engine once per step for all of a caller's requests, and a slow caller never blocks the loop
(its outputs wait in its outbox). Outputs travel as deltas (`scheduler_service/output_deltas.py`):
what each step added, never the whole history again.

Nothing is orphaned: a caller that stops calling (it died, or lost a reply such as an `add_request`
it cancelled after the actor had accepted it) is presumed gone after `caller_timeout_s` of silence
with no poll in progress; its requests are aborted (reason "server") and its outbox is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from hybrid_cache.plan import CacheType, SamplingParams
from scheduler_service.async_engine import AsyncEngine, RequestStream
from scheduler_service.engine import Engine
from scheduler_service.output_deltas import DeltaEncoder, OutputDelta
from scheduler_service.stats import EngineStats

log = logging.getLogger(__name__)


@dataclass
class _Outbox:
    outputs: list[OutputDelta | tuple[str, str]] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    request_ids: set[str] = field(default_factory=set)  # its requests still streaming
    last_seen: float = field(default_factory=time.monotonic)  # its last call (poll end, add_request)
    polls_in_progress: int = 0


# The message of the item that ends the stream of a request aborted by `abort`.
ABORTED = "RequestAborted: the request was aborted"


class EngineService:
    """Owns an `AsyncEngine` built by `build`; callers are told apart by a caller id."""

    def __init__(self, build: Callable[..., Engine], *args: object) -> None:
        self.engine = AsyncEngine(build(*args))
        self.caller_timeout_s = self.engine.engine.config.caller_timeout_s
        self._outboxes: dict[str, _Outbox] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._reaper: asyncio.Task | None = None
        self.num_callers_reaped = 0
        # Reaped callers' aborted requests (and when): told to the caller if it polls again after all.
        self._reaped: dict[str, tuple[float, list[str]]] = {}
        # Aborts that came before their request (a caller that cancelled its add_request: the abort
        # can overtake it), and when: such a request is dropped on arrival instead of running unread.
        self._early_aborts: dict[str, float] = {}

    def _outbox(self, caller: str) -> _Outbox:
        """The caller's outbox, marked as seen now; starts the reaper on first use (needs a running loop)."""
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap_forever())
        box = self._outboxes.get(caller)
        if box is None:
            box = self._outboxes[caller] = _Outbox()
            _, aborted = self._reaped.pop(caller, (0.0, []))
            box.outputs += [(rid, "aborted: the caller was silent for too long") for rid in aborted]
            if box.outputs:
                box.ready.set()
        box.last_seen = time.monotonic()
        return box

    async def add_request(
        self,
        caller: str,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        cache_type: CacheType | str | None = None,
        ttft_slo_s: float | None = None,
        tbt_slo_s: float | None = None,
        *,
        received_at: float | None = None,
        priority: int = 0,
    ) -> None:
        """Queue a request; its outputs come from `poll(caller)`. Raises ValueError / QueueFull.

        `received_at`: wall-clock time (`time.time()`) at which the ingress received it (TTFT counts from it).
        A request whose abort arrived first (within `caller_timeout_s`) is not queued: its caller gets
        `(request_id, "aborted before it started")` instead of outputs.
        """
        if self._early_aborts.pop(request_id, None) is not None:
            box = self._outbox(caller)
            box.outputs.append((request_id, "aborted before it started"))
            box.ready.set()
            return
        stream = self.engine.generate(
            prompt_token_ids, params, request_id, cache_type, ttft_slo_s, tbt_slo_s, received_at=received_at,
            priority=priority,
        )
        box = self._outbox(caller)
        box.request_ids.add(request_id)
        self._tasks[request_id] = asyncio.get_running_loop().create_task(self._forward(request_id, stream, box))

    async def _forward(self, request_id: str, stream: RequestStream, box: _Outbox) -> None:
        deltas = DeltaEncoder()
        try:
            async for output in stream:
                box.outputs.append(deltas.encode(output))
                box.ready.set()
        except asyncio.CancelledError:
            raise  # aborted: the stream aborted the request as it was cancelled
        except Exception as err:  # noqa: BLE001 - the caller must learn why its stream ended
            box.outputs.append((request_id, f"{type(err).__name__}: {err}"))
            box.ready.set()
        finally:
            box.request_ids.discard(request_id)
            self._tasks.pop(request_id, None)

    async def poll(self, caller: str, timeout_s: float) -> list[OutputDelta | tuple[str, str]]:
        """Outputs for `caller` since its last poll (waiting up to `timeout_s` for the first one).

        An item is an `OutputDelta` (what one step added to a request's output; the caller rebuilds the
        `RequestOutput` with an `OutputAssembler`), or `(request_id, error message)` when a request's
        stream failed (`ABORTED` when it was aborted by `abort`).
        """
        box = self._outbox(caller)
        box.polls_in_progress += 1
        try:
            if not box.outputs:
                try:
                    await asyncio.wait_for(box.ready.wait(), timeout_s)
                except TimeoutError:
                    return []
            outputs, box.outputs = box.outputs, []
            box.ready.clear()
            return outputs
        finally:
            box.polls_in_progress -= 1
            box.last_seen = time.monotonic()

    async def abort(self, request_id: str, reason: str = "client") -> None:
        """Abort a request (no-op if it ended). `reason`: "client", "timeout" or "server"."""
        task = self._tasks.pop(request_id, None)
        self.engine.abort(request_id, reason)  # first, so the engine counts this reason
        if task is not None:
            task.cancel()  # its stream's own abort comes second and changes nothing
            # The abort may come from another caller (another ingress replica): the stream's own
            # caller must still learn that it ended, or it would wait for its timeout.
            for box in self._outboxes.values():
                if request_id in box.request_ids:
                    box.outputs.append((request_id, ABORTED))
                    box.ready.set()
        else:
            self._early_aborts[request_id] = time.monotonic()

    # -- callers that went away -------------------------------------------------------------------
    async def _reap_forever(self) -> None:
        interval = self.caller_timeout_s / 4  # a silent caller is reaped within 1.25 timeouts
        while True:
            await asyncio.sleep(interval)
            self.reap_silent_callers()

    def reap_silent_callers(self, now: float | None = None) -> list[str]:
        """Abort the requests and drop the outboxes of callers silent for `caller_timeout_s` (none
        with a poll in progress); returns their ids."""
        now = time.monotonic() if now is None else now
        gone = [
            caller for caller, box in self._outboxes.items()
            if box.polls_in_progress == 0 and now - box.last_seen > self.caller_timeout_s
        ]
        self._reaped = {c: entry for c, entry in self._reaped.items() if now - entry[0] < 10 * self.caller_timeout_s}
        self._early_aborts = {r: t for r, t in self._early_aborts.items() if now - t < self.caller_timeout_s}
        for caller in gone:
            box = self._outboxes.pop(caller)
            if box.request_ids:
                self._reaped[caller] = (now, sorted(box.request_ids))
            if box.request_ids:
                log.warning("caller %s silent for %.0f s: aborting its %d requests",
                            caller, now - box.last_seen, len(box.request_ids))
            for request_id in list(box.request_ids):
                self.engine.abort(request_id, "server")
                task = self._tasks.pop(request_id, None)
                if task is not None:
                    task.cancel()
        self.num_callers_reaped += len(gone)
        return gone

    # -- state ----------------------------------------------------------------------------------
    async def stats(self) -> EngineStats:
        # In a thread: building them waits for the step in progress, which must not block polls.
        return await asyncio.to_thread(self.engine.stats)

    async def health(self) -> bool:
        return self.engine.healthy

    async def model_info(self) -> dict[str, int]:
        info = self.engine.engine.info
        return {"max_model_len": info.max_model_len, "vocab_size": info.vocab_size}

    async def shutdown(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        self.engine.shutdown()
