"""The engine loop's asyncio face, over a fake executor and a clock the test moves."""

from __future__ import annotations

import asyncio

import pytest
from test_scheduler_soak import Clock, FakeExecutor

from hybrid_cache import SamplingParams
from scheduler_service import Engine, SchedulerConfig
from scheduler_service.async_engine import AsyncEngine


class StoppableFakeExecutor(FakeExecutor):
    def shutdown(self) -> None:
        pass


def test_waiting_counts_from_the_call_not_from_the_next_step() -> None:
    """A request that arrives while a step runs waits for that step: its TTFT (and the apt policy's
    view of its waiting) must count from `generate`, not from when the loop next drains its inbox."""
    clock = Clock()
    engine = Engine(SchedulerConfig(policy="fcfs", cache_mode="kv", max_num_seqs=4),
                    StoppableFakeExecutor(num_blocks=16, seed=0), clock=clock)
    loop_engine = AsyncEngine(engine)

    async def run() -> list:
        with loop_engine._cond:  # the loop cannot take the request until the clock has moved on
            clock.now = 5.0
            stream = loop_engine.generate([5, 6, 7], SamplingParams(max_tokens=2), "late")
            clock.now = 100.0
        return [output async for output in stream]

    try:
        outputs = asyncio.run(run())
    finally:
        loop_engine.shutdown()
    assert outputs[-1].finished
    ttft = loop_engine.stats().metrics.time_to_first_token
    assert ttft.count == 1 and ttft.sum == pytest.approx(95.0)
