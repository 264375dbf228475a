"""Engine-side reliability: a failed step costs only the requests it touched, the loop never dies of
it, the policies never stall with work pending, abandoned streams and silent callers are aborted, and
the numbers (SLO counts, rejections, health) tell the truth. No model: a fake executor."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest
from test_scheduler_soak import Clock, FakeExecutor

from hybrid_cache import SamplingParams
from hybrid_cache.plan import BatchPlan, CacheType
from scheduler_service import Engine, QueueFull, SchedulerConfig
from scheduler_service.async_engine import AsyncEngine, EngineDeadError
from scheduler_service.engine import DuplicateRequestId
from scheduler_service.engine_service import EngineService
from scheduler_service.executor import SequenceFailed

LONG = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


class FaultyExecutor(FakeExecutor):
    """A FakeExecutor that raises `fault(plan)`'s exception in the steps where it returns one."""

    def __init__(self, num_blocks: int = 64) -> None:
        super().__init__(num_blocks=num_blocks, seed=0)
        self.fault: Callable[[BatchPlan], Exception | None] = lambda plan: None
        self.rng.random = lambda: 1.0  # never EOS: lengths are exact

    def execute(self, plan: BatchPlan) -> list[int]:
        error = self.fault(plan)
        if error is not None:
            raise error
        return super().execute(plan)

    def shutdown(self) -> None:
        pass


def make_engine(executor: FakeExecutor | None = None, clock: Clock | None = None, **config: object) -> Engine:
    settings = SchedulerConfig(**{"policy": "fcfs", "cache_mode": "kv", "max_num_seqs": 8} | config)
    return Engine(settings, executor or FaultyExecutor(), clock=clock or Clock())


def run_to_end(engine: Engine, limit: int = 1000) -> dict[str, object]:
    """Step until idle; the final output of every request that ended."""
    ends = {}
    for _ in range(limit):
        if not engine.has_unfinished():
            return ends
        for out in engine.step():
            if out.finished:
                ends[out.request_id] = out
    raise AssertionError("the engine did not become idle")


def assert_idle_and_empty(engine: Engine) -> None:
    assert not engine.has_unfinished() and not engine.requests
    assert engine.cache.num_free == engine.cache.num_blocks
    engine.cache.check_invariants()


# -- a step that fails never ends the engine ---------------------------------------------------------
def test_a_failure_traced_to_one_request_fails_only_that_request() -> None:
    executor = FaultyExecutor()
    engine = make_engine(executor)
    ids = [engine.add_request([5, 6, 7], LONG) for _ in range(3)]
    poison = engine.requests[ids[1]].seq_id
    executor.fault = lambda plan: (
        SequenceFailed("sampling failed for this request", [poison])
        if any(s.seq_id == poison for s in plan.seqs) and engine.num_steps >= 2 else None
    )
    ends = run_to_end(engine)
    assert ends[ids[1]].finish_reason == "error" and ends[ids[1]].error == "sampling failed for this request"
    for rid in (ids[0], ids[2]):
        assert ends[rid].finish_reason == "length" and len(ends[rid].token_ids) == 6
    assert engine.num_failed_steps == 1
    assert_idle_and_empty(engine)
    assert run_to_end_one(engine).finish_reason == "length", "the engine still serves"


def run_to_end_one(engine: Engine):  # noqa: ANN201 - a RequestOutput
    rid = engine.add_request([9, 9], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    return run_to_end(engine)[rid]


def test_a_failure_of_unknown_cause_fails_the_step_and_the_engine_goes_on() -> None:
    executor = FaultyExecutor()
    engine = make_engine(executor, max_num_seqs=2)
    first = [engine.add_request([5, 6, 7], LONG) for _ in range(2)]
    engine.step()  # both prefilled
    later = engine.add_request([8, 9], LONG)  # waits: the step holds 2 sequences at most
    faults = [RuntimeError("/secret/path.py: boom")]
    executor.fault = lambda plan: faults.pop() if faults else None  # the next step fails, once
    ends = run_to_end(engine)
    for rid in first:
        assert ends[rid].finish_reason == "error"
        assert "/secret" not in ends[rid].error and "boom" not in ends[rid].error, "no internals in answers"
    assert ends[later].finish_reason == "length", "a request not in the failed step is unaffected"
    assert engine.num_failed_steps == 1
    assert_idle_and_empty(engine)
    assert run_to_end_one(engine).finish_reason == "length"


def test_a_scheduling_error_fails_the_request_it_came_from() -> None:
    engine = make_engine()
    good, bad = engine.add_request([5, 6], LONG), engine.add_request([7, 8], LONG)
    request = engine.requests[bad]
    real = engine.scheduler._plan_prefill

    def plan_prefill(r, cache_type, num_new):  # noqa: ANN001, ANN202 - the scheduler's own signature
        if r is request:
            raise KeyError("a bug traced to this request")
        return real(r, cache_type, num_new)

    engine.scheduler._plan_prefill = plan_prefill
    ends = run_to_end(engine)
    assert ends[bad].finish_reason == "error" and ends[good].finish_reason == "length"
    assert_idle_and_empty(engine)


def test_the_loop_survives_any_exception_and_keeps_serving() -> None:
    executor = FaultyExecutor()
    engine = make_engine(executor)
    loop_engine = AsyncEngine(engine)
    real_step = engine.step
    calls = {"n": 0}

    def step():  # noqa: ANN202
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("a bug outside the guarded parts of a step")
        return real_step()

    engine.step = step

    async def scenario() -> list:
        first = loop_engine.generate([5, 6, 7], LONG, "first")
        outs = [out async for out in first]
        engine.step = real_step
        executor.fault = lambda plan: ZeroDivisionError() if any(s.seq_id == 1 for s in plan.seqs) else None
        second = [out async for out in loop_engine.generate([5, 6], LONG, "second")]
        executor.fault = lambda plan: None
        third = [out async for out in loop_engine.generate([5, 6], LONG, "third")]
        return [outs[-1], second[-1], third[-1]]

    try:
        first, second, third = asyncio.run(asyncio.wait_for(scenario(), 30))
        assert first.finish_reason == "error" and second.finish_reason == "error"
        assert third.finish_reason == "length" and len(third.token_ids) == 6
        stats = loop_engine.stats()
        assert stats.healthy and loop_engine.healthy
        assert stats.num_failed_steps == 2 and stats.num_running == stats.num_waiting == 0
        assert stats.cache.num_free == stats.cache.num_blocks
    finally:
        loop_engine.shutdown()
    assert not loop_engine.stats().healthy, "a stopped engine does not report itself healthy"


# -- the policies never stall with work pending ------------------------------------------------------
@pytest.mark.parametrize(("mode", "override"), [("hidden", None), ("kv", "hidden"), ("hybrid", "hidden")])
def test_apt_runs_requests_that_may_only_use_the_hidden_cache(mode: str, override: str | None) -> None:
    """apt's hidden value p + floor − U·α·m is negative at realistic α: such requests never ran."""
    engine = make_engine(policy="apt", cache_mode=mode, recompute_seconds_per_block=1e-3, max_num_seqs=16)
    ids = [engine.add_request([5] * 30, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
                              cache_type=override) for _ in range(6)]
    ends = run_to_end(engine)
    assert all(ends[rid].finish_reason == "length" and ends[rid].cache_type is None for rid in ids)
    assert engine.tokens_by_cache_type["hidden"] == 6 * 20
    assert engine.num_preemptions == 0, "a forced-hidden running request is not preempted every step"
    assert engine.scheduler.num_policy_fallbacks == 0
    assert_idle_and_empty(engine)


@pytest.mark.parametrize("policy", ["fcfs", "apt"])
def test_a_request_that_fits_only_as_hidden_runs_as_hidden_without_preempting_itself(policy: str) -> None:
    # 8 blocks: KV holds 32 tokens, hidden 64. The request grows to 60 tokens: only hidden fits.
    engine = make_engine(FaultyExecutor(num_blocks=8), policy=policy, cache_mode="hybrid")
    rid = engine.add_request([5] * 20, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    assert engine.requests[rid].cache_override is CacheType.HIDDEN
    ends = run_to_end(engine)
    assert ends[rid].finish_reason == "length" and len(ends[rid].token_ids) == 40
    assert ends[rid].num_preemptions == 0 and engine.num_conversions == 0
    assert engine.scheduler.num_policy_fallbacks == 0
    assert_idle_and_empty(engine)


def test_a_policy_that_stalls_or_raises_is_replaced_for_that_step_and_counted() -> None:
    engine = make_engine(policy="apt")
    rid = engine.add_request([5, 6], LONG)
    engine.scheduler.policy.schedule = lambda view: (_ for _ in ()).throw(ValueError("policy bug"))
    ends = run_to_end(engine)
    assert ends[rid].finish_reason == "length"
    assert engine.stats().num_policy_fallbacks == 6


def test_out_of_vocabulary_stop_token_ids_are_refused() -> None:
    engine = make_engine()
    with pytest.raises(ValueError, match="stop_token_ids"):
        engine.add_request([5], SamplingParams(stop_token_ids=[100]))
    assert engine.stats().num_rejected == {"invalid": 1, "queue_full": 0}
    assert_idle_and_empty(engine)


def test_a_duplicate_request_id_is_its_own_refusal_and_harms_nothing() -> None:
    """Its own type (not a plain ValueError), so every front end answers it as ALREADY_EXISTS / 409."""
    engine = make_engine()
    engine.add_request([5, 6], LONG, request_id="mine")
    with pytest.raises(DuplicateRequestId, match="already in use"):
        engine.add_request([7], LONG, request_id="mine")
    outputs = run_to_end(engine)
    assert outputs["mine"].finish_reason == "length" and outputs["mine"].prompt_token_ids == [5, 6]
    assert_idle_and_empty(engine)


# -- nothing is orphaned ------------------------------------------------------------------------------
def test_a_stream_dropped_before_it_is_read_aborts_its_request() -> None:
    engine = make_engine()
    loop_engine = AsyncEngine(engine)

    async def scenario() -> None:
        stream = loop_engine.generate([5, 6, 7], SamplingParams(max_tokens=200, ignore_eos=True), "dropped")
        del stream  # the client went away before the body started
        kept = [out async for out in loop_engine.generate([5, 6], LONG, "kept")]
        assert kept[-1].finish_reason == "length"

    try:
        asyncio.run(scenario())
        deadline = time.monotonic() + 10
        while loop_engine.stats().num_running + loop_engine.stats().num_waiting and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = loop_engine.stats()
        assert stats.num_running == stats.num_waiting == 0 and stats.cache.num_free == stats.cache.num_blocks
        assert stats.metrics.request_success == {"abort": 1, "length": 1}
        assert stats.metrics.aborted == {"client": 1}
        assert not loop_engine._streams and not engine.requests
    finally:
        loop_engine.shutdown()


def _slow_service(**config: object) -> EngineService:
    """A service whose steps take 10 ms: a 250-token request lasts seconds."""
    executor = FaultyExecutor()
    executor.fault = lambda plan: time.sleep(0.01)
    return EngineService(lambda: make_engine(executor, **config))


def test_a_silent_caller_has_its_requests_aborted_and_its_outbox_dropped() -> None:
    """An `add_request` whose reply the caller never saw (cancelled), and a caller that died: nobody
    polls their outputs. After `caller_timeout_s` of silence the service aborts them."""
    service = _slow_service(caller_timeout_s=0.2)

    async def scenario() -> list:
        await service.add_request("dead", "orphan", [5, 6], SamplingParams(max_tokens=250, ignore_eos=True))
        await service.add_request("alive", "ok", [5, 6], LONG)
        outputs: list = []
        deadline = time.monotonic() + 10
        while "dead" in service._outboxes and time.monotonic() < deadline:
            outputs += await service.poll("alive", timeout_s=0.05)
        return outputs

    try:
        outputs = asyncio.run(scenario())
        assert any(out.request_id == "ok" and out.finished for out in outputs)
        assert "dead" not in service._outboxes and "alive" in service._outboxes
        deadline = time.monotonic() + 10
        while (stats := service.engine.stats()).num_running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stats.cache.num_free == stats.cache.num_blocks and stats.num_waiting == 0
        assert stats.metrics.aborted == {"server": 1} and not service._tasks
        # The caller comes back after all: it learns that its request was aborted.
        told = asyncio.run(service.poll("dead", timeout_s=0.1))
        assert told == [("orphan", "aborted: the caller was silent for too long")]
    finally:
        asyncio.run(service.shutdown())


# -- honest numbers ------------------------------------------------------------------------------------
def test_slo_counts_every_end_and_abort_reasons_are_kept() -> None:
    clock = Clock()
    engine = make_engine(clock=clock, max_waiting=3, ttft_slo_s=10.0, tbt_slo_s=10.0)
    done = engine.add_request([5], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    timed_out = engine.add_request([5], LONG)
    gone = engine.add_request([5], LONG)
    with pytest.raises(QueueFull):
        engine.add_request([5], LONG)
    engine.step()
    assert engine.abort(timed_out, reason="timeout") and engine.abort(gone)
    assert not engine.abort(gone, reason="timeout"), "aborted once, counted once"
    run_to_end(engine)
    metrics = engine.stats().metrics
    assert metrics.request_success == {"length": 1, "abort": 2}
    assert metrics.aborted == {"timeout": 1, "client": 1}
    assert (metrics.slo_met, metrics.slo_judged) == (1, 4), "timeouts, aborts and refusals are misses"
    del done


def test_ttft_counts_from_the_ingress_receipt() -> None:
    clock = Clock()
    clock.now = 1000.0
    loop_engine = AsyncEngine(make_engine(clock=clock))

    async def scenario() -> None:
        stream = loop_engine.generate([5], SamplingParams(max_tokens=1), "r", received_at=time.time() - 2.0)
        [out async for out in stream]

    try:
        asyncio.run(scenario())
        ttft = loop_engine.stats().metrics.time_to_first_token
        assert ttft.count == 1 and 2.0 <= ttft.sum < 2.5
    finally:
        loop_engine.shutdown()


def test_rejections_from_many_threads_are_each_counted_once() -> None:
    engine = make_engine(max_waiting=1)
    loop_engine = AsyncEngine(engine)
    barrier = threading.Barrier(8)

    def reject() -> None:
        async def one() -> None:
            barrier.wait()
            for _ in range(50):
                with pytest.raises(ValueError):
                    loop_engine.generate([], LONG, "bad")
        asyncio.run(one())

    try:
        threads = [threading.Thread(target=reject) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert loop_engine.stats().num_rejected["invalid"] == 400
    finally:
        loop_engine.shutdown()


def test_a_dead_loop_is_reported_and_new_requests_are_refused() -> None:
    engine = make_engine()
    loop_engine = AsyncEngine(engine)
    engine.recover = lambda err: (_ for _ in ()).throw(RuntimeError("recovery failed"))
    engine.step = lambda: (_ for _ in ()).throw(RuntimeError("step failed"))

    async def scenario() -> None:
        with pytest.raises(EngineDeadError):
            [out async for out in loop_engine.generate([5], LONG, "r")]
        with pytest.raises(EngineDeadError):
            loop_engine.generate([5], LONG, "s")

    try:
        asyncio.run(asyncio.wait_for(scenario(), 30))
        assert not loop_engine.healthy and not loop_engine.stats().healthy
    finally:
        loop_engine.shutdown()


def test_an_abort_that_overtakes_its_request_keeps_the_request_from_running() -> None:
    """A caller that cancels its `add_request` aborts it; the abort may reach the service first."""
    service = _slow_service()

    async def scenario() -> list:
        await service.abort("cancelled")
        await service.add_request("c", "cancelled", [5, 6], SamplingParams(max_tokens=250, ignore_eos=True))
        return await service.poll("c", timeout_s=1.0)

    try:
        assert asyncio.run(scenario()) == [("cancelled", "aborted before it started")]
        stats = service.engine.stats()
        assert stats.num_running == stats.num_waiting == 0 and not service._tasks
    finally:
        asyncio.run(service.shutdown())


def test_a_queue_full_lost_race_reaches_the_caller_as_queue_full() -> None:
    """`generate` checked the queue, but it filled before the loop took the request."""
    engine = make_engine()
    loop_engine = AsyncEngine(engine)

    def full(*args: object, **kwargs: object) -> str:
        raise QueueFull("the waiting queue is full (1 requests): retry later")

    engine.add_request = full

    async def scenario() -> None:
        with pytest.raises(QueueFull):
            [out async for out in loop_engine.generate([5], LONG, "late")]

    try:
        asyncio.run(asyncio.wait_for(scenario(), 30))
        assert loop_engine.healthy and not loop_engine._streams
    finally:
        loop_engine.shutdown()


@pytest.mark.parametrize("slo", [float("nan"), -1.0, 0.0, "5", True])
def test_bad_slos_are_refused_naming_the_field(slo: object) -> None:
    engine = make_engine()
    with pytest.raises(ValueError, match="ttft_slo_s"):
        engine.add_request([5], LONG, ttft_slo_s=slo)
    assert_idle_and_empty(engine)
