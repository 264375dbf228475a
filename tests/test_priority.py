"""vLLM's `priority` (lower runs first), honoured by both policies: fcfs orders by (priority, arrival)
for admission, keeping and preemption; apt weighs each request's pending time by its priority.
Plain scheduler-level checks: no model, no engine."""

from __future__ import annotations

import itertools
import random
import statistics

import pytest

from hybrid_cache import CacheLayout, CacheManager, CacheType, SamplingParams
from hybrid_cache.info import CostModel, WorkerInfo
from hybrid_cache.plan import BatchPlan
from scheduler_service import Engine, Request, RequestStatus, SchedulerConfig
from scheduler_service.policies import SchedulerView, make_policy
from scheduler_service.policies.apt import PRIORITY_CLIP, priority_weight
from scheduler_service.scheduler import Scheduler

LAYOUT = CacheLayout(num_layers=2, hidden_size=64, num_kv_heads=4, head_dim=16, block_size=4, dtype_bytes=4)
NOW = 100.0
_ids = itertools.count()


def request(tokens: int, arrival: float, priority: int = 0, ttft: float = 50.0) -> Request:
    seq_id = next(_ids)
    return Request(f"r{seq_id}", seq_id, [7] * tokens, SamplingParams(max_tokens=64), arrival_time=arrival,
                   ttft_slo_s=ttft, tbt_slo_s=10.0, priority=priority)


def running(cache: CacheManager, r: Request, generated_at: float) -> Request:
    """`r` as a running request that decoded its first token at `generated_at` and needs one more."""
    r.output_token_ids, r.token_times = [7], [generated_at]
    cache.allocate(r.seq_id, r.num_tokens - 1, CacheType.KV)
    r.status, r.cache_type, r.num_computed_tokens = RequestStatus.RUNNING, CacheType.KV, r.num_tokens - 1
    return r


def decide(policy: str, cache: CacheManager, waiting: list[Request], run: list[Request], **config: object):  # noqa: ANN201
    settings = SchedulerConfig(policy=policy, cache_mode="kv", **config)
    view = SchedulerView(waiting=waiting, running=run, cache=cache, config=settings,
                         max_num_batched_tokens=4096, alpha=1e-4, now=NOW)
    return make_policy(policy).schedule(view)


def test_fcfs_admits_a_more_urgent_priority_before_older_requests() -> None:
    cache = CacheManager(LAYOUT, num_blocks=2)  # room for one 8-token prompt
    old, urgent = request(8, arrival=NOW - 5.0), request(8, arrival=NOW - 0.1, priority=-1)
    assert [r for r, _ in decide("fcfs", cache, [old, urgent], []).prefill] == [urgent]
    # Without a priority, the same queue is first come, first served.
    urgent.priority = 0
    assert [r for r, _ in decide("fcfs", cache, [old, urgent], []).prefill] == [old]


def test_fcfs_keeps_arrival_order_within_a_priority() -> None:
    cache = CacheManager(LAYOUT, num_blocks=4)  # room for two
    a, b = request(8, arrival=NOW - 3.0, priority=1), request(8, arrival=NOW - 2.0, priority=1)
    c = request(8, arrival=NOW - 1.0, priority=0)
    assert [r for r, _ in decide("fcfs", cache, [a, b, c], []).prefill] == [c, a]


def test_fcfs_preempts_the_least_urgent_priority_first() -> None:
    cache = CacheManager(LAYOUT, num_blocks=6)
    # Each holds 2 blocks and grows into a third at its next token: only two of the three go on.
    old_low = running(cache, request(8, arrival=NOW - 9.0, priority=5), NOW - 0.1)
    mid = running(cache, request(8, arrival=NOW - 8.0), NOW - 0.1)
    new_high = running(cache, request(8, arrival=NOW - 7.0, priority=-2), NOW - 0.1)
    decision = decide("fcfs", cache, [], [old_low, mid, new_high])
    assert decision.preempt == [old_low]
    assert [r for r, _ in decision.decode] == [new_high, mid]
    # All at one priority, the newest goes, as before.
    old_low.priority = new_high.priority = 0
    assert decide("fcfs", cache, [], [old_low, mid, new_high]).preempt == [new_high]


def test_apt_weighs_pending_time_by_priority() -> None:
    cache = CacheManager(LAYOUT, num_blocks=2)  # room for one
    old, new = request(8, arrival=NOW - 3.0), request(8, arrival=NOW - 1.0)
    assert [r for r, _ in decide("apt", cache, [old, new], []).prefill] == [old]  # 3 s against 1 s
    new.priority = -1  # counts its 1 s twice: still less than 3 s
    assert [r for r, _ in decide("apt", cache, [old, new], []).prefill] == [old]
    new.priority = -2  # four times: 4 s against 3 s
    assert [r for r, _ in decide("apt", cache, [old, new], []).prefill] == [new]
    old.priority, new.priority = 2, 0  # 3 s / 4 against 1 s
    assert [r for r, _ in decide("apt", cache, [old, new], []).prefill] == [new]


def test_apt_prefill_or_decode_comparison_weighs_priority() -> None:
    cache = CacheManager(LAYOUT, num_blocks=32)
    run = [running(cache, request(4, arrival=NOW - 5.0), NOW - 0.8) for _ in range(3)]  # 2.4 s pending
    waiting = [request(4, arrival=NOW - 1.0)]
    decision = decide("apt", cache, waiting, run, mixed=False)
    assert decision.decode and not decision.prefill
    waiting[0].priority = -2  # 4 s of weighted pending against 2.4 s
    decision = decide("apt", cache, waiting, run, mixed=False)
    assert decision.prefill and not decision.decode


def test_priority_weight_is_one_at_zero_and_bounded() -> None:
    assert priority_weight(0) == 1.0
    assert priority_weight(-1) == 2.0 and priority_weight(1) == 0.5
    assert priority_weight(10**9) == priority_weight(PRIORITY_CLIP) > 0.0
    assert priority_weight(-(10**9)) == priority_weight(-PRIORITY_CLIP) < float("inf")


def test_scheduler_puts_preempted_requests_back_most_urgent_first() -> None:
    cache = CacheManager(LAYOUT, num_blocks=64)
    scheduler = Scheduler(SchedulerConfig(), cache, make_policy("fcfs"), max_num_batched_tokens=4096, alpha=0.0)
    low, high = request(8, arrival=1.0, priority=3), request(8, arrival=2.0, priority=-3)
    for r in (low, high):
        scheduler.add(r)
    scheduler.end_step(scheduler.schedule(now=3.0))
    assert [r.priority for r in scheduler.running] == [-3, 3]  # admitted most urgent first
    for r in (low, high):
        scheduler.preempt(r)
    assert list(scheduler.waiting) == [high, low]


@pytest.mark.parametrize("policy", ["fcfs", "apt"])
def test_the_default_priority_changes_no_decision(policy: str) -> None:
    """Every request at priority 0 and every request at priority 7 decide the same."""
    def build() -> tuple[CacheManager, list[Request], list[Request]]:
        cache = CacheManager(LAYOUT, num_blocks=12)
        run = [running(cache, request(7, arrival=NOW - 9 + i), NOW - 0.3 * i) for i in range(3)]
        wait = [request(6 + i, arrival=NOW - 4 + i) for i in range(4)]
        return cache, wait, run

    cache, wait, run = build()
    base = decide(policy, cache, wait, run)
    cache, wait, run = build()
    for r in wait + run:
        r.priority = 7
    shifted = decide(policy, cache, wait, run)
    assert [r.arrival_time for r, _ in base.prefill] == [r.arrival_time for r, _ in shifted.prefill]
    assert [r.arrival_time for r, _ in base.decode] == [r.arrival_time for r, _ in shifted.decode]
    assert base.preempt == [] and shifted.preempt == []


class _Executor:
    """Answers token 5 for every sequence (never EOS: requests end at max_tokens)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks

    def info(self) -> WorkerInfo:
        return WorkerInfo(vocab_size=100, max_model_len=256, eos_token_ids=(2,), layout=LAYOUT,
                          num_blocks=self.num_blocks, cache_bytes=self.num_blocks * LAYOUT.block_bytes,
                          cost=CostModel(0.0, 2e-4, LAYOUT.block_size))

    def execute(self, plan: BatchPlan) -> list[int]:
        return [5] * len(plan.seqs)

    def timings(self) -> dict[str, float]:
        return {}


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_engine_add_request_takes_priority_and_refuses_a_non_integer() -> None:
    engine = Engine(SchedulerConfig(), _Executor(num_blocks=16), clock=_Clock())
    rid = engine.add_request([5, 6, 7], SamplingParams(max_tokens=2), priority=-3)
    assert engine.requests[rid].priority == -3
    assert engine.requests[engine.add_request([5], SamplingParams(max_tokens=2))].priority == 0
    for bad in ("high", 1.5, True, None):
        with pytest.raises(ValueError, match="priority"):
            engine.add_request([5], SamplingParams(max_tokens=2), priority=bad)  # type: ignore[arg-type]
    assert len(engine.requests) == 2 and len(engine.scheduler.waiting) == 2


@pytest.mark.parametrize("policy", ["fcfs", "apt"])
@pytest.mark.parametrize("cache_mode", ["kv", "hybrid"])
def test_overloaded_engine_serves_the_urgent_priority_sooner_and_loses_nothing(policy: str, cache_mode: str) -> None:
    """Arrivals faster than a small cache drains, each request at priority -1 or 1 at random: every
    request ends with its tokens, no block leaks, and the urgent ones wait less for their first token."""
    rng = random.Random(f"{policy}/{cache_mode}")
    clock = _Clock()
    config = SchedulerConfig(policy=policy, cache_mode=cache_mode, max_num_seqs=6, max_waiting=None,
                             ttft_slo_s=5.0, tbt_slo_s=1.0)
    engine = Engine(config, _Executor(num_blocks=24), clock=clock)
    requests: list[Request] = []
    for step in range(1_500):
        clock.now += 0.01
        if step < 1_000 and rng.random() < 0.6:
            prompt = [rng.randrange(3, 100) for _ in range(rng.randint(4, 24))]
            rid = engine.add_request(prompt, SamplingParams(max_tokens=rng.randint(4, 16)),
                                     priority=rng.choice([-1, 1]))
            requests.append(engine.requests[rid])
        engine.step()
        engine.cache.check_invariants()
    while engine.has_unfinished():
        clock.now += 0.01
        engine.step()
    assert all(r.status is RequestStatus.FINISHED and len(r.output_token_ids) == r.params.max_tokens
               for r in requests)
    assert engine.cache.num_free == engine.cache.num_blocks
    waits = {p: statistics.mean(r.first_token_time - r.arrival_time for r in requests if r.priority == p)
             for p in (-1, 1)}
    assert waits[-1] < waits[1] / 2, waits
