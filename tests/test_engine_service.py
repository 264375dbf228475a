"""The central scheduler as a service: callers add requests and long-poll outputs, locally and as Ray
actors (two engine replicas side by side), with the tokens of the offline engine."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from cluster import LLM, SamplingParams
from cluster.config import load_config
from cluster.engine_builder import build_engine
from scheduler_service.engine_service import ABORTED, EngineService
from scheduler_service.output_deltas import OutputAssembler

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13], [20, 21]]


def config_for(model: Path, **overrides: object):  # noqa: ANN201 - an AptServeConfig
    base = {"model.path": str(model), "model.dtype": "float32", "cache.block_size": 4, "cache.num_blocks": 64}
    return load_config(overrides=base | overrides)


def offline_tokens(model: Path) -> list[list[int]]:
    llm = LLM(str(model), dtype="float32", block_size=4, num_blocks=64)
    return [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]


async def collect(stream) -> list[int]:  # noqa: ANN001 - an async stream of RequestOutputs
    outputs = [out async for out in stream]
    assert outputs and outputs[-1].finished
    return outputs[-1].token_ids


def test_service_in_process(tiny_models: dict[str, Path]) -> None:
    expected = offline_tokens(tiny_models["opt"])
    service = EngineService(lambda: build_engine(config_for(tiny_models["opt"]))[0])

    ended: list[tuple[str, str]] = []

    async def scenario() -> dict[str, list[int]]:
        for i, prompt in enumerate(PROMPTS):
            await service.add_request("caller", f"r{i}", prompt, GREEDY)
        await service.add_request("caller", "gone", [4, 4, 4], SamplingParams(temperature=0, max_tokens=200))
        await service.abort("gone")  # as another ingress replica would: its caller must still learn it
        tokens: dict[str, list[int]] = {}
        streams = {f"r{i}": OutputAssembler(prompt) for i, prompt in enumerate(PROMPTS)}
        deadline = time.monotonic() + 60
        while len(tokens) < len(PROMPTS) and time.monotonic() < deadline:
            for delta in await service.poll("caller", timeout_s=1.0):
                if isinstance(delta, tuple):
                    ended.append(delta)
                elif delta.request_id != "gone":
                    out = streams[delta.request_id].assemble(delta)  # deltas, rebuilt as a remote caller does
                    if out.finished:
                        tokens[out.request_id] = out.token_ids
        return tokens

    try:
        tokens = asyncio.run(scenario())
        assert [tokens[f"r{i}"] for i in range(len(PROMPTS))] == expected
        assert ended == [("gone", ABORTED)]
        deadline = time.monotonic() + 10
        while service.engine.stats().cache.num_free != 64 and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = service.engine.stats()
        assert stats.cache.num_free == 64 and stats.num_running == stats.num_waiting == 0
    finally:
        asyncio.run(service.shutdown())


@pytest.mark.timeout(300)
def test_two_replicas_as_ray_actors(tiny_models: dict[str, Path]) -> None:
    from cluster.engine_client import EngineClient
    from cluster.ray_cluster import start_engine_replicas, stop_engine_replicas
    from cluster.ray_runtime import ensure_ray

    ensure_ray(num_cpus=2)
    expected = offline_tokens(tiny_models["opt"])
    handles = start_engine_replicas(config_for(tiny_models["opt"], **{"parallel.replicas": 2}), name_prefix="test")
    try:
        async def scenario() -> None:
            clients = [EngineClient(h, poll_timeout_s=0.5) for h in handles]
            for client in clients:
                streams = [await client.generate(p, GREEDY, f"{client.caller}-{i}") for i, p in enumerate(PROMPTS)]
                assert await asyncio.gather(*(collect(s) for s in streams)) == expected
            # A caller that walks away mid-stream aborts its request and frees its blocks.
            stream = await clients[0].generate([4, 4, 4], SamplingParams(temperature=0, max_tokens=200), "walk")
            async for out in stream:
                if len(out.token_ids) >= 3:
                    break
            await stream.aclose()
            with pytest.raises(ValueError, match="prompt is empty"):
                await clients[1].generate([], GREEDY, "bad")
            for client in clients:
                deadline = time.monotonic() + 20
                while (stats := await client.stats()).cache.num_free != 64 and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                assert stats.cache.num_free == 64 and stats.num_running == 0
                assert await client.health()

        asyncio.run(scenario())
    finally:
        stop_engine_replicas(handles)


@pytest.mark.timeout(300)
def test_replica_driving_tensor_parallel_workers(tiny_models: dict[str, Path]) -> None:
    """The product's shape: a scheduler actor (no CPU) whose engine drives two TP worker actors."""
    from cluster.engine_client import EngineClient
    from cluster.ray_cluster import start_engine_replicas, stop_engine_replicas
    from cluster.ray_runtime import ensure_ray, ray

    ensure_ray(num_cpus=2)
    expected = offline_tokens(tiny_models["llama"])
    config = config_for(tiny_models["llama"], **{"parallel.executor": "ray", "parallel.tensor_parallel_size": 2,
                                                  "scheduler.cache_mode": "hybrid", "scheduler.policy": "apt"})
    (handle,) = start_engine_replicas(config, name_prefix="test-tp")
    try:
        async def scenario() -> list[list[int]]:
            client = EngineClient(handle, poll_timeout_s=0.5)
            streams = [await client.generate(p, GREEDY, f"tp-{i}") for i, p in enumerate(PROMPTS)]
            return list(await asyncio.gather(*(collect(s) for s in streams)))

        assert asyncio.run(scenario()) == expected
        stats = ray.get(handle.stats.remote())
        assert stats.cache.num_free == stats.cache.num_blocks == 64
    finally:
        stop_engine_replicas([handle])


class _Method:
    """A stand-in for a Ray actor method: `.remote(...)` runs `fn` and returns an awaitable."""

    def __init__(self, fn) -> None:  # noqa: ANN001 - any async function
        self.fn = fn

    def remote(self, *args: object):  # noqa: ANN201 - a coroutine wrapped in a future
        return asyncio.ensure_future(self.fn(*args))


def test_client_streams_end_when_polling_fails() -> None:
    """If the replica cannot be polled (it died, or the call was cancelled), every open stream ends with
    an error and its request is aborted, instead of waiting for outputs that never come."""
    from cluster.engine_client import EngineClient, RemoteRequestError

    aborted: list[str] = []

    async def add_request(*_: object) -> None:
        return None

    async def poll(*_: object) -> list:
        await asyncio.sleep(0.05)
        raise RuntimeError("the actor died")

    async def abort(request_id: str) -> None:
        aborted.append(request_id)

    handle = type("Handle", (), {"add_request": _Method(add_request), "poll": _Method(poll), "abort": _Method(abort)})

    async def scenario() -> None:
        client = EngineClient(handle(), poll_timeout_s=0.1)
        streams = [await client.generate([1, 2], GREEDY, f"r{i}") for i in range(3)]
        for stream in streams:
            with pytest.raises(RemoteRequestError, match="the actor died"):
                await asyncio.wait_for(collect(stream), timeout=10)
        await asyncio.sleep(0)  # let the submitted aborts run
        assert sorted(aborted) == ["r0", "r1", "r2"] and not client._streams

    asyncio.run(scenario())
