"""Engine replicas behind one face, routed around failure.

Each request goes to the healthy replica with the fewest of this router's requests in flight (ties: the
lowest index). A replica whose submit or stream fails with an engine failure is marked down and skipped;
a down replica is probed (its `health` call) at most once per `probe_interval_s`, lazily, when requests
or /health arrive: it comes back up when the probe answers True. A probe answered False means the actor
lives but its engine loop stopped: the router restarts the actor (Ray re-runs its constructor, which
builds a new engine). While no replica is up, requests get `NoHealthyReplica` (HTTP 503, gRPC UNAVAILABLE).

Request ids in flight are known here, so a client-chosen id already in use is refused before anything
is sent (`DuplicateRequestId`).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Sequence

from cluster.engine_client import EngineClient
from cluster.errors import ENGINE_FAILURES, DuplicateRequestId, NoHealthyReplica, unwrap
from cluster.gateways import DOWN, UP
from cluster.streams import RequestStream
from hybrid_cache.plan import CacheType, SamplingParams
from scheduler_service.stats import EngineStats

log = logging.getLogger(__name__)


def is_engine_failure(err: BaseException) -> bool:
    return isinstance(err, ENGINE_FAILURES) or isinstance(unwrap(err), ENGINE_FAILURES)


class ReplicaRouter:
    def __init__(
        self, clients: list[EngineClient], max_model_len: int, vocab_size: int, probe_interval_s: float = 1.0
    ) -> None:
        if not clients:
            raise ValueError("a router needs at least one engine replica")
        self.clients = clients
        self.max_model_len, self.vocab_size = max_model_len, vocab_size
        self.num_replicas = len(clients)
        self.probe_interval_s = probe_interval_s
        self._up = [True] * len(clients)
        self._next_probe = [0.0] * len(clients)
        self._probes: dict[int, asyncio.Task] = {}
        self._in_flight = [0] * len(clients)
        self._owner: dict[str, int | None] = {}  # request id → replica (None while it is being submitted)

    # -- health ------------------------------------------------------------------------------------
    def mark_down(self, index: int, err: BaseException) -> None:
        if self._up[index]:
            log.warning("engine replica %d is down: %r", index, err)
        self._up[index] = False

    async def _probe(self, index: int) -> None:
        self._next_probe[index] = time.monotonic() + self.probe_interval_s
        client = self.clients[index]
        try:
            alive = await client.health()
        except Exception as err:  # noqa: BLE001 - dead, restarting or slow: still down
            self.mark_down(index, err)
            return
        if alive:
            if not self._up[index]:
                log.warning("engine replica %d is back up", index)
            self._up[index] = True
            return
        self.mark_down(index, RuntimeError("its engine loop stopped"))
        log.warning("restarting engine replica %d (its engine loop stopped)", index)
        client.restart()

    def _probe_due(self) -> list[asyncio.Task]:
        """Start probes of the down replicas whose turn has come; returns every probe running."""
        now = time.monotonic()
        for index, up in enumerate(self._up):
            if not up and index not in self._probes and now >= self._next_probe[index]:
                # a fresh context: Ray would cancel the probe with the request that happened to start it
                task = asyncio.get_running_loop().create_task(self._probe(index), context=contextvars.Context())
                self._probes[index] = task
                task.add_done_callback(lambda _, i=index: self._probes.pop(i, None))
        return list(self._probes.values())

    async def health(self) -> dict[str, str]:
        """Every replica probed now (concurrently, each bounded by its client's call timeout)."""
        running = dict(self._probes)
        await asyncio.gather(*(self._probe(i) for i in range(self.num_replicas) if i not in running),
                             *running.values())
        return {str(i): UP if up else DOWN for i, up in enumerate(self._up)}

    # -- requests ----------------------------------------------------------------------------------
    async def _candidates(self) -> list[int]:
        """Up replicas, fewest in flight first; when none is up, the due probes are awaited first."""
        probes = self._probe_due()
        if not any(self._up) and probes:
            await asyncio.gather(*probes)
        up = [i for i in range(self.num_replicas) if self._up[i]]
        return sorted(up, key=self._in_flight.__getitem__)

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
        if request_id in self._owner:
            raise DuplicateRequestId(f"request id {request_id!r} is already in use")
        self._owner[request_id] = None
        try:
            for index in await self._candidates():
                client = self.clients[index]
                try:
                    stream = await client.generate(
                        prompt_token_ids, params, request_id, cache_type, ttft_slo_s, tbt_slo_s, received_at,
                        priority=priority,
                    )
                except Exception as err:
                    if not is_engine_failure(err):
                        raise
                    self.mark_down(index, err)
                    continue  # nothing was queued on a replica that failed: try the next one
                self._in_flight[index] += 1
                self._owner[request_id] = index
                return RequestStream(stream, abandon=lambda c=client: c.abandon(request_id),
                                     closed=lambda err, i=index: self._closed(request_id, i, err))
            raise NoHealthyReplica("no engine replica is up")
        except BaseException:
            self._owner.pop(request_id, None)
            raise

    def _closed(self, request_id: str, index: int, err: BaseException | None) -> None:
        self._in_flight[index] -= 1
        self._owner.pop(request_id, None)
        if err is not None and is_engine_failure(err):
            self.mark_down(index, err)

    async def abort(self, request_id: str, reason: str = "client") -> None:
        """Abort on the replica that runs it, or on every up replica if another ingress sent it."""
        index = self._owner.get(request_id)
        targets = [index] if index is not None else [i for i, up in enumerate(self._up) if up]
        for target in targets:
            try:
                await self.clients[target].abort(request_id, reason)
            except Exception as err:  # noqa: BLE001 - an abort on a dead replica has nothing to stop
                if not is_engine_failure(err):
                    raise
                self.mark_down(target, err)

    async def replica_stats(self) -> list[tuple[str, EngineStats | None]]:
        """Each replica's statistics, None for one that is down (its last numbers are not served)."""
        self._probe_due()

        async def one(index: int) -> EngineStats | None:
            if not self._up[index]:
                return None
            try:
                stats = await self.clients[index].stats()
            except Exception as err:  # noqa: BLE001 - dead or restarting: down
                self.mark_down(index, err)
                return None
            if not stats.healthy:  # the actor answers but its engine loop stopped: the next probe restarts it
                self.mark_down(index, RuntimeError("its engine loop stopped"))
            return stats

        stats = await asyncio.gather(*(one(i) for i in range(self.num_replicas)))
        return [(str(i), s) for i, s in enumerate(stats)]
