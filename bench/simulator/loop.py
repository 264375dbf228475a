"""The discrete-event simulation: the production `Engine` (its `Scheduler`, policy and `CacheManager`)
on a virtual clock, over an executor that computes nothing and only advances the clock.

Each iteration: requests whose arrival time has come are added (stamped with that arrival); the
engine plans a step exactly as in production; `SimExecutor.execute` asks the step-time model how long
that plan takes, moves the clock by it and answers one synthetic token per sequence (never EOS: each
request stops at its trace output length, `max_tokens` with `ignore_eos`); the engine stamps the tokens
with the clock. When nothing runs the clock jumps to the next arrival. Nothing of the scheduling is
re-implemented here, so a change to a policy changes the simulation.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from bench.simulator.step_time import StepShape, StepTimeModel
from bench.slo_metrics import RequestRecord
from hybrid_cache.info import CostModel, WorkerInfo
from hybrid_cache.layout import CacheLayout
from hybrid_cache.plan import BatchPlan, SamplingParams
from scheduler_service.config import SchedulerConfig
from scheduler_service.engine import Engine, QueueFull
from scheduler_service.request import Request, RequestStatus

SYNTHETIC_TOKEN = 0  # any id: EOS is ignored and there are no stop tokens


@dataclass(frozen=True)
class TraceRequest:
    """One request of a workload: when it arrives (s) and how many tokens it reads and writes."""

    prompt_len: int
    output_len: int
    arrival: float


class VirtualClock:
    """Seconds since the start of the trace; moved only by the simulation."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class StepStats:
    """What the simulated steps cost, in virtual seconds, by kind."""

    steps: dict[str, int] = field(default_factory=lambda: {"prefill": 0, "decode": 0, "mixed": 0})
    seconds: dict[str, float] = field(default_factory=lambda: {"prefill": 0.0, "decode": 0.0, "mixed": 0.0})
    recompute_seconds: float = 0.0
    recompute_tokens: int = 0
    model_wall_seconds: float = 0.0  # real time spent in the step-time model (the simulator's own cost)


class SimExecutor:
    """An `Executor` whose steps take the modelled time on the virtual clock and sample token 0."""

    def __init__(self, info: WorkerInfo, model: StepTimeModel, clock: VirtualClock) -> None:
        self._info, self.model, self.clock = info, model, clock
        self.stats = StepStats()

    def info(self) -> WorkerInfo:
        return self._info

    def execute(self, plan: BatchPlan) -> list[int]:
        if not plan.seqs:
            return []
        started = time.perf_counter()
        shape = StepShape.of(plan)
        seconds = self.model.seconds(shape)
        kind = "mixed" if shape.num_prefill and shape.num_decode else "prefill" if shape.num_prefill else "decode"
        self.stats.steps[kind] += 1
        self.stats.seconds[kind] += seconds
        if shape.recompute_tokens and self.model.recompute is not None:
            self.stats.recompute_tokens += shape.recompute_tokens
            self.stats.recompute_seconds += self.model.recompute.seconds(shape.recompute_tokens)
        self.clock.now += seconds
        self.stats.model_wall_seconds += time.perf_counter() - started
        return [SYNTHETIC_TOKEN] * len(plan.seqs)

    def timings(self) -> dict[str, float]:
        return {f"model_{k}": v for k, v in self.stats.seconds.items()}

    def shutdown(self) -> None:
        pass


@dataclass
class SimResult:
    """One record per request (the workload's order), the engine's statistics and the run's cost."""

    records: list[RequestRecord]
    step_stats: StepStats
    num_preemptions: int
    num_conversions: int
    tokens_by_cache_type: dict[str, int]
    num_blocks: int
    alpha: float
    wall_seconds: float
    scheduling_seconds: float  # wall time inside the production scheduler (`Scheduler.schedule`)
    virtual_seconds: float


def startup_step_cost(model: StepTimeModel) -> object | None:
    """What the engine's start-up step profile would measure on the simulated device (KV steps only):
    `intercept + per_token·tokens + per_context·context + per_sequence·sequences`, fitted by
    non-negative least squares to the model's prefill and decode steps over a grid of sizes (the
    engine's own fit; `per_sequence` only where its `StepCostModel` has that term). None if this
    engine has no step-cost model."""
    try:
        from hybrid_cache.info import StepCostModel
    except ImportError:
        return None
    with_sequences = "seconds_per_sequence" in StepCostModel.__dataclass_fields__
    rows, seconds = [], []
    for n in (1, 4, 16, 64, 128):
        for ctx in (128, 512, 1024, 2048):
            rows.append([1.0, n, n * ctx, n])
            seconds.append(model.compute_seconds(StepShape(num_decode=n, decode_context=n * ctx)))
    for k in (1, 2):
        for p in (64, 256, 512, 1024, 2048):
            rows.append([1.0, k * p, k * p * (p + 1) // 2, k])
            seconds.append(model.compute_seconds(StepShape(k, k * p, k * p * p)))
    design = np.array(rows, dtype=np.float64)
    if not with_sequences:
        design = design[:, :3]
    return StepCostModel(*non_negative_lstsq(design, np.array(seconds)))


def non_negative_lstsq(design: np.ndarray, target: np.ndarray) -> list[float]:
    """argmin ‖design·β − target‖ over β ≥ 0, by trying every subset of columns (a handful here): the
    best unconstrained fit on a subset whose coefficients are all non-negative, zero elsewhere."""
    columns = design.shape[1]
    best, best_error = [0.0] * columns, float(np.sum(target**2))
    for subset in itertools.chain.from_iterable(
        itertools.combinations(range(columns), k) for k in range(1, columns + 1)
    ):
        beta = np.linalg.lstsq(design[:, subset], target, rcond=None)[0]
        if (beta < 0).any():
            continue
        error = float(np.sum((design[:, subset] @ beta - target) ** 2))
        if error < best_error:
            best_error, best = error, [0.0] * columns
            for column, value in zip(subset, beta):
                best[column] = float(value)
    return best


def build_engine(config: SchedulerConfig, layout: CacheLayout, num_blocks: int, max_model_len: int,
                 vocab_size: int, model: StepTimeModel) -> tuple[Engine, SimExecutor, VirtualClock]:
    """The production engine over a simulated executor; α is what the model's recompute implies, and
    the step-cost model (where the engine has one) what a start-up profile would measure."""
    recompute = model.recompute
    if recompute is not None:
        per_token = recompute.alpha(layout.block_size) / layout.block_size
        cost = CostModel(recompute.fixed_seconds(), per_token, layout.block_size)
    else:
        cost = CostModel(0.0, 0.0, layout.block_size)
    extra = {}
    if "step_cost" in WorkerInfo.__dataclass_fields__:
        extra["step_cost"] = startup_step_cost(model)
    info = WorkerInfo(vocab_size=vocab_size, max_model_len=max_model_len, eos_token_ids=(), layout=layout,
                      num_blocks=num_blocks, cache_bytes=num_blocks * layout.block_bytes, cost=cost, **extra)
    clock = VirtualClock()
    executor = SimExecutor(info, model, clock)
    return Engine(config, executor, clock=clock), executor, clock


def run(engine: Engine, executor: SimExecutor, clock: VirtualClock, workload: Sequence[TraceRequest],
        progress: bool = False, desc: str = "simulate") -> SimResult:
    """Replay `workload` (sorted by arrival) through `engine` until every request has ended."""
    started = time.perf_counter()
    order = sorted(range(len(workload)), key=lambda i: workload[i].arrival)
    requests: dict[int, Request | None] = {}
    pending = iter(order)
    upcoming = next(pending, None)
    bar = tqdm(total=len(workload), desc=desc, unit="req", disable=not progress, mininterval=0.5)
    done = 0
    for iteration in itertools.count():
        while upcoming is not None and workload[upcoming].arrival <= clock.now:
            requests[upcoming] = _add(engine, workload[upcoming])
            upcoming = next(pending, None)
        if not engine.has_unfinished():
            if upcoming is None:
                break
            clock.now = workload[upcoming].arrival
            continue
        before = clock.now
        engine.step()
        if clock.now == before:  # nothing ran (e.g. all preempted this step): let time pass
            clock.now = workload[upcoming].arrival if upcoming is not None else before + 1e-3
        if progress and iteration % 256 == 0:
            # Added minus still in the engine (which forgets a request once it ends; refused ones never enter).
            finished = len(requests) - len(engine.requests)
            bar.update(finished - done)
            done = finished
    bar.update(len(workload) - done)
    bar.close()
    stats = engine.stats()
    records = [_record(i, workload[i], requests.get(i)) for i in range(len(workload))]
    return SimResult(
        records=records, step_stats=executor.stats, num_preemptions=stats.num_preemptions,
        num_conversions=stats.num_conversions, tokens_by_cache_type=stats.tokens_by_cache_type,
        num_blocks=stats.cache.num_blocks, alpha=stats.alpha, wall_seconds=time.perf_counter() - started,
        scheduling_seconds=stats.step_seconds.get("scheduling", 0.0), virtual_seconds=clock.now,
    )


def _add(engine: Engine, item: TraceRequest) -> Request | None:
    """Queue one request as a client would; None when the engine refuses it (it counts as a miss)."""
    params = SamplingParams(max_tokens=max(1, item.output_len), temperature=0.0, ignore_eos=True)
    try:
        request_id = engine.add_request([SYNTHETIC_TOKEN] * max(1, item.prompt_len), params,
                                        arrival_time=item.arrival)
    except (ValueError, QueueFull):
        return None
    return engine.requests[request_id]


def _record(index: int, item: TraceRequest, request: Request | None) -> RequestRecord:
    if request is None:
        return RequestRecord(request_id=str(index), arrival=item.arrival, error="rejected",
                             prompt_len=item.prompt_len, output_len=0)
    times = request.token_times
    return RequestRecord(
        request_id=str(index), arrival=item.arrival, first_token_time=times[0] if times else None,
        token_times=list(times), finished=request.status is RequestStatus.FINISHED, error=request.error,
        prompt_len=item.prompt_len, output_len=len(request.output_token_ids),
    )
