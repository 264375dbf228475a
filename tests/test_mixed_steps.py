"""Mixed steps on hand-built situations: which decodes and prompt chunks a step carries, under the token
budget, the step-time budget of the on-time decodes, and the paper's prefill-or-decode comparison;
and the step-time model's fit and its predicted-against-measured report (fake clocks: no timing)."""

from __future__ import annotations

import itertools

import pytest

from hybrid_cache import CacheLayout, CacheManager, CacheType, SamplingParams
from hybrid_cache.info import CostModel, StepCostModel
from scheduler_service import Request, RequestStatus, SchedulerConfig
from scheduler_service.policies import SchedulerView, make_policy
from scheduler_service.step_time import StepLoad, StepTimePredictor, StepTimeTracker, attended_keys

LAYOUT = CacheLayout(num_layers=2, hidden_size=64, num_kv_heads=4, head_dim=16, block_size=4, dtype_bytes=4)
NOW = 100.0
# 10 ms a step, 1 ms a token, nothing per attended key: easy numbers to check a budget against.
STEP = StepCostModel(intercept_seconds=0.010, seconds_per_token=0.001, seconds_per_context=0.0)
PREDICTOR = StepTimePredictor(STEP, CostModel(0.0, 0.0, LAYOUT.block_size))
_ids = itertools.count()


def prompt(tokens: int, waited: float, ttft: float = 5.0) -> Request:
    seq_id = next(_ids)
    return Request(f"p{seq_id}", seq_id, [7] * tokens, SamplingParams(max_tokens=8), NOW - waited, ttft_slo_s=ttft)


def decoding(cache: CacheManager, tokens: int, gap: float, tbt: float = 1.0) -> Request:
    """A running request that emitted its last token `gap` seconds ago and decodes next."""
    seq_id = next(_ids)
    r = Request(f"d{seq_id}", seq_id, [7] * (tokens - 1), SamplingParams(max_tokens=64), NOW - gap - 1.0,
                tbt_slo_s=tbt)
    r.output_token_ids, r.token_times = [7], [NOW - gap]
    cache.allocate(r.seq_id, tokens - 1, CacheType.KV)
    r.status, r.cache_type, r.num_computed_tokens = RequestStatus.RUNNING, CacheType.KV, tokens - 1
    return r


def decide(cache: CacheManager, waiting: list[Request], running: list[Request], policy: str = "apt",
           max_tokens: int = 4096, step_time: StepTimePredictor | None = PREDICTOR, **config: object):  # noqa: ANN201
    settings = SchedulerConfig(policy=policy, cache_mode="kv", growth_reserve_tokens=0, step_time_headroom=1.0,
                               **config)
    view = SchedulerView(waiting=waiting, running=running, cache=cache, config=settings,
                         max_num_batched_tokens=max_tokens, alpha=1e-4, now=NOW, step_time=step_time)
    return make_policy(policy).schedule(view)


def test_the_issue_probe_a_backlog_that_cannot_be_admitted_does_not_stall_the_decodes() -> None:
    """A chosen prompt pending 0.05 s against running requests pending 0.5 s: a decode step, even
    though a backlog too big for the cache has waited far longer (the comparison counts chosen ones)."""
    cache = CacheManager(LAYOUT, num_blocks=12)
    running = [decoding(cache, 5, gap=0.5) for _ in range(2)]  # 2 blocks each, 4 used, 8 free
    backlog = [prompt(400, waited=30.0) for _ in range(5)]  # 100 blocks each: never fits
    chosen = prompt(4, waited=0.05)
    decision = decide(cache, backlog + [chosen], running, mixed=False)
    assert [r for r, _ in decision.decode] == running and not decision.prefill
    # The paper's structure still prefills once the chosen prompt has waited longer than the decodes.
    late_chosen = prompt(4, waited=2.0)
    decision = decide(cache, backlog + [late_chosen], running, mixed=False)
    assert [r for r, _ in decision.prefill] == [late_chosen] and not decision.decode


def test_a_mixed_step_carries_the_decodes_and_a_chunk_within_the_token_budget() -> None:
    cache = CacheManager(LAYOUT, num_blocks=64)
    running = [decoding(cache, 9, gap=0.1) for _ in range(3)]
    long_prompt = prompt(100, waited=0.2)
    decision = decide(cache, [long_prompt], running, max_tokens=20, step_time=None)
    assert [r for r, _ in decision.decode] == running
    assert decision.prefill == [(long_prompt, CacheType.KV)]
    assert decision.tokens_for(long_prompt) == 17 and decision.num_batched_tokens == 20


def test_prompt_tokens_stop_at_the_tightest_on_time_decode_budget() -> None:
    cache = CacheManager(LAYOUT, num_blocks=128)
    # Gaps of 0.8995 s and 0.5 s against a 1 s TBT SLO: the step may take 100.5 ms. Two decodes cost
    # 10 + 2 ms, which leaves 88.5 ms: 88 prompt tokens.
    running = [decoding(cache, 9, gap=0.8995), decoding(cache, 9, gap=0.5)]
    long_prompt = prompt(300, waited=0.2)
    decision = decide(cache, [long_prompt], running)
    assert decision.tokens_for(long_prompt) == 88
    load = StepLoad()
    for r, _ in decision.decode:
        load.add(1, r.num_computed_tokens, False)
    load.add(88, 0, False)
    assert PREDICTOR.seconds(load) <= 0.1005 < PREDICTOR.seconds(load.plus(1, 88, False))
    # A decode already past its SLO does not bind: the other one's 0.5 s slack leaves 488 ms, and
    # 0.3 s of prompt tokens fit: the whole prompt goes.
    running[0].token_times = [NOW - 1.5]
    decision = decide(cache, [long_prompt], running)
    assert decision.tokens_for(long_prompt) == 300 and long_prompt.seq_id not in decision.num_new_tokens


def test_the_budget_goes_to_the_most_urgent_prompt_first() -> None:
    cache = CacheManager(LAYOUT, num_blocks=64)
    running = [decoding(cache, 9, gap=0.95)]  # 50 ms: 39 prompt tokens after the decode's 11 ms
    relaxed = prompt(30, waited=1.0, ttft=10.0)  # 9 s before its deadline
    urgent = prompt(30, waited=1.0, ttft=2.0)  # 1 s before its deadline
    decision = decide(cache, [relaxed, urgent], running, min_chunk_tokens=16)
    assert decision.tokens_for(urgent) == 30
    # 9 tokens would be left for the relaxed prompt: below min_chunk_tokens, so it waits.
    assert [r for r, _ in decision.prefill] == [urgent]


def test_when_the_budget_leaves_nothing_prompts_that_waited_longer_go_anyway() -> None:
    cache = CacheManager(LAYOUT, num_blocks=64)
    running = [decoding(cache, 9, gap=0.995)]  # 5 ms of slack: less than one step's intercept
    fresh = prompt(40, waited=0.5)
    decision = decide(cache, [fresh], running, max_tokens=32)
    assert not decision.prefill, "0.5 s of pending against 0.995 s: the decode is protected"
    old = prompt(40, waited=3.0)
    decision = decide(cache, [old], running, max_tokens=32)
    assert decision.prefill == [(old, CacheType.KV)] and decision.tokens_for(old) == 31


def test_fcfs_decodes_first_then_chunks_the_running_prompt_then_admits() -> None:
    cache = CacheManager(LAYOUT, num_blocks=64)
    decodes = [decoding(cache, 9, gap=0.1) for _ in range(2)]
    half_done = prompt(30, waited=1.0)  # 12 of 30 tokens prefilled: 18 to go
    cache.allocate(half_done.seq_id, 12, CacheType.KV)
    half_done.status, half_done.cache_type, half_done.num_computed_tokens = RequestStatus.RUNNING, CacheType.KV, 12
    newcomer = prompt(50, waited=0.5)
    decision = decide(cache, [newcomer], [half_done] + decodes, policy="fcfs", max_tokens=25)
    assert [r for r, _ in decision.decode] == decodes + [half_done]
    assert decision.tokens_for(half_done) == 18
    assert decision.prefill == [(newcomer, CacheType.KV)] and decision.tokens_for(newcomer) == 5


def test_a_prompt_being_prefilled_holds_its_whole_length_against_admissions() -> None:
    cache = CacheManager(LAYOUT, num_blocks=10)
    half_done = prompt(36, waited=1.0)  # 9 blocks once prefilled; 3 held so far
    cache.allocate(half_done.seq_id, 12, CacheType.KV)
    half_done.status, half_done.cache_type, half_done.num_computed_tokens = RequestStatus.RUNNING, CacheType.KV, 12
    newcomer = prompt(8, waited=5.0)  # 2 blocks: 7 are free now, but only 1 is not promised
    for policy in ("fcfs", "apt"):
        decision = decide(cache, [newcomer], [half_done], policy=policy, max_tokens=8)
        assert not decision.prefill and decision.decode == [(half_done, CacheType.KV)], policy
        assert decision.tokens_for(half_done) == 8


def test_the_step_time_fit_recovers_a_known_model() -> None:
    """A fake clock that advances by a known linear step time: the least-squares fit recovers it."""
    from worker.cost_model import profile_step_time, step_profile_plans

    true = StepCostModel(0.004, 2e-5, 3e-8)
    now = [0.0]

    def execute(plan) -> None:  # noqa: ANN001
        now[0] += true.seconds(*_features(plan))

    plans = step_profile_plans(LAYOUT, num_blocks=2000, max_len=2048)
    fitted = profile_step_time(execute, plans, repeats=1, clock=lambda: now[0])
    assert fitted.intercept_seconds == pytest.approx(true.intercept_seconds, rel=1e-6)
    assert fitted.seconds_per_token == pytest.approx(true.seconds_per_token, rel=1e-6)
    assert fitted.seconds_per_context == pytest.approx(true.seconds_per_context, rel=1e-6)


def _features(plan) -> tuple[int, int]:  # noqa: ANN001
    return sum(s.num_new for s in plan.seqs), sum(attended_keys(s.num_new, s.start_pos) for s in plan.seqs)


def test_the_report_holds_predicted_against_measured() -> None:
    tracker = StepTimeTracker(STEP, window=3)
    for predicted, measured in [(0.10, 0.20), (0.10, 0.11), (0.10, 0.08), (0.10, 0.10)]:
        tracker.record(predicted, measured)
    report = tracker.report()
    assert report.num_steps == 4 and report.predicted_seconds == pytest.approx(0.4)
    assert report.abs_error_seconds == pytest.approx(0.10 + 0.01 + 0.02)
    assert report.median_abs_error_seconds == pytest.approx(0.01)  # the last 3: 0.01, 0.02, 0.00
    assert report.median_rel_error == pytest.approx(0.01 / 0.11)


def test_the_correction_is_the_median_measured_over_model_ratio() -> None:
    tracker = StepTimeTracker(STEP, window=3)
    assert tracker.scale() == 1.0 and tracker.report().scale == 1.0  # nothing measured yet
    tracker.record(0.10, 0.20)  # the model alone said 0.10: ratio 2
    assert tracker.scale() == pytest.approx(2.0)
    tracker.record(0.20, 0.30, scale=2.0)  # predicted with scale 2, so the model said 0.10: ratio 3
    tracker.record(0.25, 0.10, scale=2.5)  # the model said 0.10: ratio 1
    assert tracker.scale() == pytest.approx(2.0)  # median of 2, 3, 1
    tracker.record(0.20, 0.0, scale=2.0)  # a clock that did not move: no ratio
    assert tracker.scale() == pytest.approx(2.0)
    tracker.record(0.20, 0.80, scale=2.0)  # ratio 8 pushes the oldest (2) out of the window of 3
    assert tracker.scale() == pytest.approx(3.0)  # median of 3, 1, 8
    assert tracker.report(scale=3.0).scale == 3.0
    load = StepLoad().plus(10, 0, False)
    assert StepTimePredictor(STEP, PREDICTOR.recompute, scale=3.0).seconds(load) == pytest.approx(
        3 * PREDICTOR.seconds(load))


@pytest.mark.parametrize("adapt", [True, False])
def test_the_engine_rescales_the_model_by_what_its_steps_take(adapt: bool) -> None:
    """Steps that take 3x the model's prediction: with adaptation the scheduler's predictor is scaled by
    3 and its later predictions match; without, it keeps predicting a third of every step."""
    import dataclasses

    from test_scheduler_soak import Clock, FakeExecutor

    from scheduler_service import Engine

    clock = Clock()

    class SlowExecutor(FakeExecutor):
        def info(self):  # noqa: ANN202
            return dataclasses.replace(super().info(), step_cost=STEP)

        def execute(self, plan):  # noqa: ANN001, ANN202
            clock.now += 3 * STEP.seconds(*_load(plan))
            return super().execute(plan)

    engine = Engine(SchedulerConfig(policy="apt", step_time_adapt=adapt), SlowExecutor(num_blocks=64, seed=0),
                    clock=clock)
    for i in range(4):
        engine.add_request([5 + i] * 6, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    report = engine.stats().step_time
    assert report.num_steps > 10
    if adapt:
        assert engine.scheduler.step_time.scale == pytest.approx(3.0) and report.scale == pytest.approx(3.0)
        assert report.median_rel_error == pytest.approx(0.0, abs=1e-9)  # every step after the first
    else:
        assert engine.scheduler.step_time.scale == 1.0 and report.scale == 1.0
        assert report.median_rel_error == pytest.approx(2 / 3)


def _load(plan) -> tuple[int, int, int]:  # noqa: ANN001
    load = StepLoad.of_plan(plan)
    return load.tokens, load.context, load.sequences
