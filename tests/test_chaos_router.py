"""Chaos, routing around failure: the replica router over stand-in engine clients (no Ray).

A dead replica fails fast and so never has requests in flight: a router that picks the least loaded
replica would pick it every time. These check that a failed replica is skipped until a probe finds it
back, that a replica whose engine loop stopped is restarted, that no replica up means 503 (gRPC
UNAVAILABLE), and that a request id in flight is refused without touching the first request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace

import pytest
from ray.exceptions import ActorDiedError

from cluster.errors import DuplicateRequestId, Kind, NoHealthyReplica, classify
from cluster.gateways import DOWN, UP
from cluster.router import ReplicaRouter
from hybrid_cache.plan import SamplingParams
from scheduler_service.request import RequestOutput

PARAMS = SamplingParams(max_tokens=2)


def output(request_id: str, finished: bool) -> RequestOutput:
    return RequestOutput(request_id=request_id, prompt_token_ids=[1], token_ids=[5], new_token_ids=[5],
                         text="x", finished=finished, finish_reason="length" if finished else None,
                         cache_type="kv", num_preemptions=0)


class FakeClient:
    """An engine client: `alive` decides whether calls fail like a dead actor; `loop_ok` is its health."""

    def __init__(self) -> None:
        self.alive, self.loop_ok = True, True
        self.submitted: list[str] = []
        self.aborted: list[str] = []
        self.restarts = 0

    def _check(self) -> None:
        if not self.alive:
            raise ActorDiedError()

    async def generate(self, prompt, params, request_id, *_: object, priority: int = 0) -> AsyncIterator[RequestOutput]:  # noqa: ANN001
        self._check()
        self.submitted.append(request_id)

        async def outputs() -> AsyncIterator[RequestOutput]:
            yield output(request_id, False)
            yield output(request_id, True)

        return outputs()

    def abandon(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def abort(self, request_id: str, reason: str = "client") -> None:
        self._check()
        self.aborted.append(request_id)

    async def health(self) -> bool:
        self._check()
        return self.loop_ok

    async def stats(self) -> object:
        self._check()
        return SimpleNamespace(healthy=self.loop_ok)

    def restart(self) -> None:
        self.restarts += 1


def router_of(n: int) -> tuple[ReplicaRouter, list[FakeClient]]:
    clients = [FakeClient() for _ in range(n)]
    return ReplicaRouter(clients, max_model_len=64, vocab_size=100, probe_interval_s=0.0), clients  # type: ignore[arg-type]


async def finish(stream: AsyncIterator[RequestOutput]) -> list[RequestOutput]:
    return [o async for o in stream]


def test_a_dead_replica_is_skipped_until_a_probe_finds_it_back() -> None:
    router, (first, second) = router_of(2)
    first.alive = False

    async def run() -> None:
        for i in range(4):  # the first request finds replica 0 dead and goes on to replica 1
            assert (await finish(await router.generate([1], PARAMS, f"r{i}")))[-1].finished
        assert first.submitted == [] and second.submitted == ["r0", "r1", "r2", "r3"]
        assert await router.health() == {"0": DOWN, "1": UP}
        assert dict(await router.replica_stats()) == {"0": None, "1": SimpleNamespace(healthy=True)}
        first.alive = True
        await router.generate([1], PARAMS, "probe-trigger")  # goes to replica 1; a probe of 0 starts aside
        for _ in range(3):
            await asyncio.sleep(0)
        await router.generate([1], PARAMS, "back")  # replica 0 is up again, and the least loaded
        assert first.submitted == ["back"]
        assert await router.health() == {"0": UP, "1": UP}

    asyncio.run(run())


def test_no_replica_up_is_unavailable_then_served_once_back() -> None:
    router, (only,) = router_of(1)
    only.alive = False

    async def run() -> None:
        with pytest.raises(NoHealthyReplica) as refused:
            await router.generate([1], PARAMS, "a")
        failure = classify(refused.value)
        assert failure.kind is Kind.UNAVAILABLE and failure.kind.status == 503 and failure.kind.retry_later
        assert await router.health() == {"0": DOWN}
        only.alive = True  # Ray restarted it: the next request probes it first and is served
        assert (await finish(await router.generate([1], PARAMS, "b")))[-1].finished

    asyncio.run(run())


def test_a_replica_whose_engine_loop_stopped_is_restarted() -> None:
    router, (only,) = router_of(1)
    only.loop_ok = False

    async def run() -> None:
        assert dict(await router.replica_stats())["0"].healthy is False  # /metrics: up 0, seen by the router
        with pytest.raises(NoHealthyReplica):
            await router.generate([1], PARAMS, "a")  # the due probe finds the loop stopped: restart
        assert only.restarts == 1
        only.loop_ok = True  # restarted by Ray with a new engine
        assert (await finish(await router.generate([1], PARAMS, "b")))[-1].finished

    asyncio.run(run())


def test_a_request_id_in_flight_is_refused_and_the_first_runs_on() -> None:
    router, (only,) = router_of(1)

    async def run() -> None:
        first = await router.generate([1], PARAMS, "twin")
        with pytest.raises(DuplicateRequestId):
            await router.generate([1], PARAMS, "twin")
        assert classify(DuplicateRequestId("x")).kind is Kind.ALREADY_EXISTS
        assert only.submitted == ["twin"] and only.aborted == []
        assert (await finish(first))[-1].finished
        assert (await finish(await router.generate([1], PARAMS, "twin")))[-1].finished  # free again

    asyncio.run(run())


def test_a_stream_dropped_unread_aborts_its_request_and_frees_its_id() -> None:
    router, (only,) = router_of(1)

    async def run() -> None:
        stream = await router.generate([1], PARAMS, "dropped")
        await stream.aclose()
        assert only.aborted == ["dropped"]
        assert (await finish(await router.generate([1], PARAMS, "dropped")))[-1].finished

    asyncio.run(run())


def test_an_abort_for_a_request_of_another_ingress_reaches_every_up_replica() -> None:
    router, clients = router_of(3)
    clients[1].alive = False

    async def run() -> None:
        await router.generate([1], PARAMS, "x")  # marks replica 1 down if it is chosen; it is not (0 is)
        await router.health()
        await router.abort("elsewhere")
        assert clients[0].aborted == ["elsewhere"] and clients[2].aborted == ["elsewhere"]

    asyncio.run(run())


class _Remote:
    """A stand-in for a Ray actor method: `.remote(...)` runs `fn` and returns an awaitable."""

    def __init__(self, fn) -> None:  # noqa: ANN001 - any async function
        self.fn = fn

    def remote(self, *args: object, **kwargs: object):  # noqa: ANN201 - a future
        return asyncio.ensure_future(self.fn(*args, **kwargs))


def test_a_submit_cancelled_midway_aborts_the_request() -> None:
    """The caller leaves while `add_request` is in flight (the actor may accept it after): the client
    sends an abort, which the engine applies even if it arrives before the request."""
    from cluster.engine_client import EngineClient

    aborted: list[str] = []

    async def add_request(*_: object, **__: object) -> None:
        await asyncio.sleep(10)

    async def abort(request_id: str) -> None:
        aborted.append(request_id)

    handle = type("Handle", (), {"add_request": _Remote(add_request), "abort": _Remote(abort)})

    async def run() -> None:
        client = EngineClient(handle())
        submit = asyncio.create_task(client.generate([1], PARAMS, "left"))
        await asyncio.sleep(0.01)
        submit.cancel()
        with pytest.raises(asyncio.CancelledError):
            await submit
        await asyncio.sleep(0)
        assert aborted == ["left"] and not client._streams

    asyncio.run(run())
