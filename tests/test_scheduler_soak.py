"""A long randomized run of the engine over a fake executor: arrivals, finishes and aborts for 10,000
iterations, with every policy × cache mode. Nothing is lost, nothing leaks, memory never exceeds the
budget, and everything finishes once arrivals stop."""

from __future__ import annotations

import dataclasses
import random

import pytest

from hybrid_cache import CacheLayout, SamplingParams
from hybrid_cache.info import CostModel, StepCostModel, WorkerInfo
from hybrid_cache.plan import BatchPlan
from scheduler_service import Engine, QueueFull, SchedulerConfig
from scheduler_service.stats import EngineStats

LAYOUT = CacheLayout(num_layers=2, hidden_size=64, num_kv_heads=4, head_dim=16, block_size=4, dtype_bytes=4)
EOS = 2


class FakeExecutor:
    """Checks every plan against the cache accounting and answers random tokens (EOS now and then)."""

    def __init__(self, num_blocks: int, seed: int) -> None:
        self.num_blocks = num_blocks
        self.rng = random.Random(seed)
        self.steps = 0

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            vocab_size=100, max_model_len=256, eos_token_ids=(EOS,), layout=LAYOUT, num_blocks=self.num_blocks,
            cache_bytes=self.num_blocks * LAYOUT.block_bytes, cost=CostModel(0.0, 2e-4, LAYOUT.block_size),
        )

    def execute(self, plan: BatchPlan) -> list[int]:
        self.steps += 1
        for seq in plan.seqs:
            tokens_per_block = LAYOUT.tokens_per_block(seq.cache_type)
            assert len(seq.block_table) * tokens_per_block >= seq.context_len, "plan exceeds its blocks"
            assert all(0 <= b < self.num_blocks for b in seq.block_table)
        return [EOS if self.rng.random() < 0.02 else self.rng.randrange(3, 100) for _ in plan.seqs]

    def timings(self) -> dict[str, float]:
        return {}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


ITERATIONS = 10_000


@pytest.mark.parametrize("policy", ["fcfs", "apt"])
@pytest.mark.parametrize("cache_mode", ["kv", "hybrid"])
def test_soak(policy: str, cache_mode: str) -> None:
    rng = random.Random(hash((policy, cache_mode)) % 1000)
    clock = Clock()
    executor = FakeExecutor(num_blocks=48, seed=1)
    config = SchedulerConfig(policy=policy, cache_mode=cache_mode, max_num_seqs=16, ttft_slo_s=2.0, tbt_slo_s=0.3)
    engine = Engine(config, executor, clock=clock)
    added: set[str] = set()
    ended: dict[str, str] = {}
    longest_wait = 0

    def absorb(outputs) -> None:
        for out in outputs:
            assert out.request_id not in ended, f"{out.request_id} reported after it ended"
            if out.finished:
                ended[out.request_id] = out.finish_reason

    for _ in range(ITERATIONS):
        clock.now += 0.01 + rng.random() * 0.04
        for _ in range(rng.choices([0, 1, 2], weights=[92, 6, 2])[0]):
            prompt = [rng.randrange(3, 100) for _ in range(rng.randint(1, 60))]
            params = SamplingParams(max_tokens=rng.randint(1, 80), temperature=0.0)
            added.add(engine.add_request(prompt, params))
        if rng.random() < 0.02 and engine.requests:
            engine.abort(rng.choice(list(engine.requests)))
        absorb(engine.step())
        engine.cache.check_invariants()
        # The lifecycle: queued requests are new or preempted, running ones hold blocks, none is lost.
        assert {r.status.value for r in engine.scheduler.waiting} <= {"waiting", "preempted"}
        assert all(r.status.value == "running" and engine.cache.table(r.seq_id) for r in engine.scheduler.running)
        assert len(engine.scheduler.waiting) + len(engine.scheduler.running) == len(engine.requests)
        usage = engine.cache.usage()
        assert usage.kv_blocks + usage.hidden_blocks <= usage.num_blocks
        # Nobody waits for ever while memory is free: waiting requests are admitted eventually.
        if engine.scheduler.waiting:
            head_age = clock.now - min(r.arrival_time for r in engine.scheduler.waiting)
            longest_wait = max(longest_wait, head_age)
    steps_left = 0
    while engine.has_unfinished():
        clock.now += 0.02
        absorb(engine.step())
        steps_left += 1
        assert steps_left < 20_000, "requests still unfinished long after arrivals stopped"
    assert set(ended) == added, f"{len(added - set(ended))} requests lost"
    assert set(ended.values()) <= {"stop", "length", "abort"}
    assert engine.cache.num_free == engine.cache.num_blocks
    engine.cache.check_invariants()
    stats = engine.stats()
    print(f"{policy}/{cache_mode}: {len(added)} requests, {stats.num_preemptions} preemptions, "
          f"{stats.num_conversions} conversions, tokens {stats.tokens_by_cache_type}, longest wait {longest_wait:.1f}s")
    if cache_mode == "hybrid":
        assert stats.tokens_by_cache_type["hidden"] > 0


ALPHAS = [1e-5, 1e-3, 0.1]  # seconds of recompute per block of hidden history
SHORT_ITERATIONS = 1_500


def assert_every_request_ended(engine: Engine, added: set[str], ended: dict[str, str]) -> EngineStats:
    """No request lost, none failed, no block leaked, no policy fallback or failed step; the final stats."""
    assert set(ended) == added, f"{len(added - set(ended))} requests lost"
    assert set(ended.values()) <= {"stop", "length", "abort"}
    assert engine.cache.num_free == engine.cache.num_blocks, "blocks leaked"
    stats = engine.stats()
    assert stats.num_policy_fallbacks == 0 and stats.num_failed_steps == 0
    return stats


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("cache_mode", ["kv", "hidden", "hybrid"])
@pytest.mark.parametrize("policy", ["fcfs", "apt"])
def test_soak_tiny_budgets_and_overrides(policy: str, cache_mode: str, alpha: float) -> None:
    """Tiny caches, random per-request cache types, arrivals, aborts and a bounded queue, at every α:
    the engine never raises, never runs an empty step while work is pending, never needs the FCFS
    fallback, leaks no block, and every request ends — or was refused when it was added."""
    rng = random.Random(f"{policy}/{cache_mode}/{alpha}")
    clock = Clock()
    num_blocks = rng.choice([4, 6, 10, 16])
    config = SchedulerConfig(policy=policy, cache_mode=cache_mode, max_num_seqs=8, max_waiting=24, ttft_slo_s=2.0,
                             tbt_slo_s=0.3, recompute_seconds_per_block=alpha)
    engine = Engine(config, FakeExecutor(num_blocks=num_blocks, seed=rng.randrange(1000)), clock=clock)
    added: set[str] = set()
    refused = {"invalid": 0, "queue_full": 0}
    ended: dict[str, str] = {}

    def step() -> None:
        pending = engine.scheduler.has_work()
        outputs = engine.step()
        for out in outputs:
            assert out.request_id not in ended, f"{out.request_id} reported after it ended"
            if out.finished:
                ended[out.request_id] = out.finish_reason
        assert not pending or any(out.new_token_ids for out in outputs), "an empty step with work pending"
        engine.cache.check_invariants()

    for i in range(SHORT_ITERATIONS):
        clock.now += 0.005 + rng.random() * 0.03
        if i < SHORT_ITERATIONS * 3 // 4:  # then arrivals stop and everything must drain
            for _ in range(rng.choices([0, 1, 3], weights=[80, 15, 5])[0]):
                prompt = [rng.randrange(3, 100) for _ in range(rng.randint(1, 40))]
                params = SamplingParams(max_tokens=rng.randint(1, 60), temperature=0.0)
                try:
                    added.add(engine.add_request(prompt, params, cache_type=rng.choice([None, None, "kv", "hidden"])))
                except QueueFull:
                    refused["queue_full"] += 1
                except ValueError as err:
                    assert "cache blocks" in str(err), err
                    refused["invalid"] += 1
        if rng.random() < 0.03 and engine.requests:
            engine.abort(rng.choice(list(engine.requests)), reason=rng.choice(["client", "timeout"]))
        step()
    for _ in range(20_000):
        if not engine.has_unfinished():
            break
        clock.now += 0.01
        step()
    stats = assert_every_request_ended(engine, added, ended)
    assert stats.num_rejected == refused
    assert stats.metrics.slo_judged == len(added) + refused["queue_full"]
    assert added, "the soak must run requests"


DISCARDED = 1  # what the chunked soak's executor answers for a chunk short of its prompt's end


class ChunkCheckingExecutor(FakeExecutor):
    """Also checks every plan against the step limits and the requests' progress, and answers
    DISCARDED for a chunk that does not reach its request's last token (it must never be emitted)."""

    def __init__(self, num_blocks: int, seed: int, max_tokens: int, max_seqs: int, step_cost: StepCostModel) -> None:
        super().__init__(num_blocks, seed)
        self.max_tokens, self.max_seqs, self.step_cost = max_tokens, max_seqs, step_cost
        self.engine: Engine | None = None
        self.chunks = 0  # sequences that computed part of a prompt and sampled nothing
        self.batches = 0  # plans with sequences
        self.mixed_batches = 0  # plans with a decode and a prompt chunk

    def info(self) -> WorkerInfo:
        return dataclasses.replace(super().info(), step_cost=self.step_cost)

    def execute(self, plan: BatchPlan) -> list[int]:
        tokens = super().execute(plan)
        if not plan.seqs:
            return tokens  # it only tells the workers which requests ended
        self.batches += 1
        assert sum(s.num_new for s in plan.seqs) <= self.max_tokens and len(plan.seqs) <= self.max_seqs
        assert len({s.seq_id for s in plan.seqs}) == len(plan.seqs)
        by_seq = {r.seq_id: r for r in self.engine.requests.values()}
        kinds = set()
        for i, seq in enumerate(plan.seqs):
            request = by_seq[seq.seq_id]
            assert seq.start_pos == request.num_computed_tokens and seq.num_new >= 1
            assert seq.token_ids == request.all_token_ids[seq.start_pos : seq.context_len]
            if seq.context_len < request.num_tokens:
                self.chunks += 1
                tokens[i] = DISCARDED
            admitting = request.num_computed_tokens == 0  # admitted this step (end_step has not run)
            kinds.add("prefill" if admitting or request.is_prefilling else "decode")
        self.mixed_batches += kinds == {"prefill", "decode"}
        return tokens


CHUNKED_CASES = [
    (p, c, m) for c in ("kv", "hidden", "hybrid") for p, m in (("fcfs", True), ("apt", True), ("apt", False))
]


@pytest.mark.parametrize(("policy", "cache_mode", "mixed"), CHUNKED_CASES)
def test_soak_chunked_prefill(policy: str, cache_mode: str, mixed: bool) -> None:
    """Token budgets far below the prompts (so most prompts are prefilled in chunks, and chunks are
    preempted), a step-time model whose budget binds, arrivals and aborts: no exception, no empty
    step with work pending, no FCFS fallback, no leak, no token emitted for a partial chunk, every
    step within the token and sequence limits, and every request ends."""
    rng = random.Random(f"chunked/{policy}/{cache_mode}/{mixed}")
    clock = Clock()
    max_tokens = rng.choice([5, 8, 16])
    # 10 ms per step + 1 ms per token + 10 µs per attended key: a 0.3 s TBT SLO binds at a few dozen tokens.
    step_cost = StepCostModel(0.01, 1e-3, 1e-5)
    executor = ChunkCheckingExecutor(num_blocks=24, seed=rng.randrange(1000), max_tokens=max_tokens, max_seqs=6,
                                     step_cost=step_cost)
    config = SchedulerConfig(policy=policy, cache_mode=cache_mode, max_num_seqs=6, max_num_batched_tokens=max_tokens,
                             ttft_slo_s=2.0, tbt_slo_s=0.3, mixed=mixed, min_chunk_tokens=3)
    engine = Engine(config, executor, clock=clock)
    executor.engine = engine
    added: set[str] = set()
    ended: dict[str, str] = {}

    def step() -> None:
        pending, executed = engine.scheduler.has_work(), executor.batches
        outputs = engine.step()
        for out in outputs:
            assert out.request_id not in ended, f"{out.request_id} reported after it ended"
            assert DISCARDED not in out.token_ids, "a partial chunk's token was emitted"
            if out.finished:
                ended[out.request_id] = out.finish_reason
        assert not pending or executor.batches > executed or any(o.finished for o in outputs), "an empty step"
        engine.cache.check_invariants()
        clock.now += step_cost.intercept_seconds

    for i in range(SHORT_ITERATIONS):
        clock.now += rng.random() * 0.02
        if i < SHORT_ITERATIONS * 3 // 4:
            for _ in range(rng.choices([0, 1, 2], weights=[85, 12, 3])[0]):
                prompt = [rng.randrange(3, 100) for _ in range(rng.randint(1, 50))]
                params = SamplingParams(max_tokens=rng.randint(1, 30), temperature=0.0)
                try:
                    added.add(engine.add_request(prompt, params))
                except QueueFull:
                    pass
        if rng.random() < 0.02 and engine.requests:
            engine.abort(rng.choice(list(engine.requests)))
        step()
    for _ in range(20_000):
        if not engine.has_unfinished():
            break
        step()
    stats = assert_every_request_ended(engine, added, ended)
    assert executor.chunks > 0, "the token budget was meant to split prompts"
    # Mixed steps carry decodes and prompt chunks together; the paper's structure never does.
    assert (executor.mixed_batches > 0) == mixed, executor.mixed_batches
    assert stats.step_time.num_steps == executor.batches and stats.step_time.model == step_cost
