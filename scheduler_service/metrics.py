"""What the engine counts for Prometheus: plain counters and histograms, kept where the numbers are.

The engine updates an `EngineMetrics` as requests progress; `EngineStats` carries a copy, and the
serving layer renders the copies of every replica as one Prometheus page (`cluster/metrics.py`).
Names follow vLLM's, so dashboards map one to one (DESIGN §7).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

from scheduler_service.request import Request

# SLO-scale latencies: 10 ms to 60 s.
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0)
# Scheduler time per iteration: 0.1 ms to 100 ms.
SCHEDULER_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)


@dataclass
class Histogram:
    """Counts per bucket (upper bounds `buckets`, then +Inf), their sum and count."""

    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it), +Inf last: Prometheus' form."""
        totals = np.cumsum(self.counts).tolist()
        return list(zip([*self.buckets, float("inf")], totals))


def meets_slo(request: Request) -> bool:
    """The paper's attainment: first token within the TTFT SLO and the P99 of its gaps within the TBT SLO."""
    times = request.token_times
    if not times or times[0] - request.arrival_time > request.ttft_slo_s:
        return False
    gaps = np.diff(times)
    return len(gaps) == 0 or float(np.percentile(gaps, 99)) <= request.tbt_slo_s


@dataclass
class EngineMetrics:
    """Cumulative counts since the engine started."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    request_success: dict[str, int] = field(default_factory=dict)  # by finish reason
    slo_met: int = 0  # requests that finished (stop/length) within their SLOs
    slo_judged: int = 0  # requests that finished (stop/length)
    time_to_first_token: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS_S))
    inter_token_latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS_S))
    e2e_request_latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS_S))
    scheduler_iteration: Histogram = field(default_factory=lambda: Histogram(SCHEDULER_BUCKETS_S))

    def on_token(self, request: Request) -> None:
        """After `request` got a token (its time already appended to `token_times`)."""
        self.generation_tokens += 1
        times = request.token_times
        if len(times) == 1:
            self.prompt_tokens += len(request.prompt_token_ids)
            self.time_to_first_token.observe(times[0] - request.arrival_time)
        else:
            self.inter_token_latency.observe(times[-1] - times[-2])

    def on_finish(self, request: Request, now: float) -> None:
        reason = request.finish_reason.value if request.finish_reason else "unknown"
        self.request_success[reason] = self.request_success.get(reason, 0) + 1
        if reason in ("stop", "length"):
            self.e2e_request_latency.observe(now - request.arrival_time)
            self.slo_judged += 1
            self.slo_met += meets_slo(request)

    @property
    def slo_attainment(self) -> float | None:
        return self.slo_met / self.slo_judged if self.slo_judged else None
