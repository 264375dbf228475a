"""vLLM's `priority` field reaches the engine from every ingress: the in-process gateway, the Ray
path (router → engine client → engine service → async engine) and HTTP/gRPC bodies."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from cluster.config import load_config
from cluster.engine_builder import build_engine
from cluster.engine_client import EngineClient
from cluster.gateways import LocalGateway
from cluster.router import ReplicaRouter
from hybrid_cache.plan import SamplingParams
from scheduler_service.async_engine import AsyncEngine
from scheduler_service.engine_service import EngineService

LONG = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def recording(engine) -> list[int]:  # noqa: ANN001 - an Engine
    """Record the priority of every request the engine queues (it still queues them)."""
    seen: list[int] = []
    add = engine.add_request

    def add_request(*args, priority: int = 0, **kwargs):  # noqa: ANN002, ANN003, ANN202
        seen.append(priority)
        return add(*args, priority=priority, **kwargs)

    engine.add_request = add_request
    return seen


def config(model: Path):  # noqa: ANN201
    return load_config(overrides={"model.path": str(model), "model.dtype": "float32", "cache.block_size": 4,
                                  "cache.num_blocks": 64})


def test_local_gateway_passes_priority_to_the_engine(tiny_models: dict[str, Path]) -> None:
    engine, _ = build_engine(config(tiny_models["opt"]))
    seen = recording(engine)
    async_engine = AsyncEngine(engine)
    gateway = LocalGateway(async_engine)

    async def scenario() -> None:
        for i, priority in enumerate((3, -2, 0)):
            stream = await gateway.generate([5, 6, 7], LONG, f"r{i}", priority=priority)
            async for _ in stream:
                pass

    try:
        asyncio.run(scenario())
    finally:
        async_engine.shutdown()
    assert seen == [3, -2, 0]


def test_the_ray_path_passes_priority_to_the_engine(tiny_models: dict[str, Path]) -> None:
    """The router and engine client as the ingress runs them, over an in-process engine service standing
    in for the replica actor (its `.remote` calls awaited directly)."""
    service = EngineService(lambda: build_engine(config(tiny_models["opt"]))[0])
    seen = recording(service.engine.engine)

    class Method:
        def __init__(self, fn) -> None:  # noqa: ANN001
            self.fn = fn

        def remote(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
            return self.fn(*args, **kwargs)

    class Handle:
        add_request = Method(service.add_request)
        poll = Method(service.poll)
        abort = Method(service.abort)

    async def scenario() -> None:
        router = ReplicaRouter([EngineClient(Handle())], max_model_len=2048, vocab_size=256)
        stream = await router.generate([5, 6, 7], LONG, "ray-1", priority=7)
        outputs = [out async for out in stream]
        assert outputs[-1].finished and len(outputs[-1].token_ids) == 8

    try:
        asyncio.run(scenario())
    finally:
        asyncio.run(service.shutdown())
    assert seen == [7]
    deadline = time.monotonic() + 5
    while service.engine.stats().num_running and time.monotonic() < deadline:
        time.sleep(0.05)
