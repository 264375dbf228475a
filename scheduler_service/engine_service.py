"""The central scheduler as a service: an engine loop that many callers reach through four calls.

`EngineService` is plain asyncio (no Ray import): `cluster` hosts it in a Ray actor that reserves no
CPU, and tests can drive it directly. Callers add requests and then long-poll for outputs: one
`poll` returns every output the engine produced for that caller since the last poll, so outputs leave
the engine once per step for all of a caller's requests, and a slow caller never blocks the loop
(its outputs wait in its outbox).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from hybrid_cache.plan import CacheType, SamplingParams
from scheduler_service.async_engine import AsyncEngine
from scheduler_service.engine import Engine, EngineStats
from scheduler_service.request import RequestOutput


@dataclass
class _Outbox:
    outputs: list[RequestOutput | tuple[str, str]] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class EngineService:
    """Owns an `AsyncEngine` built by `build`; callers are told apart by a caller id."""

    def __init__(self, build: Callable[..., Engine], *args: object) -> None:
        self.engine = AsyncEngine(build(*args))
        self._outboxes: dict[str, _Outbox] = {}
        self._tasks: dict[str, asyncio.Task] = {}

    async def add_request(
        self,
        caller: str,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        cache_type: CacheType | str | None = None,
        ttft_slo_s: float | None = None,
        tbt_slo_s: float | None = None,
    ) -> None:
        """Queue a request; its outputs come from `poll(caller)`. Raises ValueError / QueueFull."""
        stream = self.engine.generate(prompt_token_ids, params, request_id, cache_type, ttft_slo_s, tbt_slo_s)
        box = self._outboxes.setdefault(caller, _Outbox())
        self._tasks[request_id] = asyncio.get_running_loop().create_task(self._forward(request_id, stream, box))

    async def _forward(self, request_id: str, stream, box: _Outbox) -> None:  # noqa: ANN001 - an async stream
        try:
            async for output in stream:
                box.outputs.append(output)
                box.ready.set()
        except Exception as err:  # noqa: BLE001 - the caller must learn why its stream ended
            box.outputs.append((request_id, f"{type(err).__name__}: {err}"))
            box.ready.set()
        finally:
            self._tasks.pop(request_id, None)

    async def poll(self, caller: str, timeout_s: float) -> list[RequestOutput | tuple[str, str]]:
        """Outputs for `caller` since its last poll (waiting up to `timeout_s` for the first one).

        An item is a RequestOutput, or `(request_id, error message)` when a request's stream failed.
        """
        box = self._outboxes.setdefault(caller, _Outbox())
        if not box.outputs:
            try:
                await asyncio.wait_for(box.ready.wait(), timeout_s)
            except TimeoutError:
                return []
        outputs, box.outputs = box.outputs, []
        box.ready.clear()
        return outputs

    async def abort(self, request_id: str) -> None:
        task = self._tasks.pop(request_id, None)
        if task is not None:
            task.cancel()  # closing the stream aborts the request in the engine and frees its blocks
        self.engine.abort(request_id)

    async def stats(self) -> EngineStats:
        return self.engine.stats()

    async def health(self) -> bool:
        return self.engine.healthy

    async def model_info(self) -> dict[str, int]:
        info = self.engine.engine.info
        return {"max_model_len": info.max_model_len, "vocab_size": info.vocab_size}

    async def shutdown(self) -> None:
        self.engine.shutdown()
