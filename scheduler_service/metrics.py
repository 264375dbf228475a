"""What the engine counts for Prometheus: plain counters and histograms, kept where the numbers are.

The engine updates an `EngineMetrics` as requests progress; `EngineStats` carries a copy, and the
serving layer renders the copies of every replica as one Prometheus page (`cluster/metrics.py`).
Names follow vLLM's, so dashboards map one to one.

SLO attainment follows the benchmark's definition (bench/slo_metrics.py: every request sent is in the
denominator; one that errored, did not finish or produced no token misses):

- `slo_judged` counts every request the engine accepted once it has ended — whatever the reason:
  stop, length, error, or abort (by the client, a timeout or the server) — plus every request it
  refused because its waiting queue was full. Requests refused as invalid (HTTP 400) are not judged:
  the benchmark never sends them.
- `slo_met` counts those that finished (stop or length) with their first token within the TTFT SLO
  and the P99 of their token gaps within the TBT SLO (`meets_slo`). So timeouts, server-side aborts,
  errors and queue-full refusals are misses; a client that disconnects is a miss too (its request did
  not finish), and `aborted` tells these apart by reason.
- TTFT counts from the request's arrival: the ingress's receipt when the ingress passed it
  (`received_at`), else the engine's.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field, replace

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

    def copy(self) -> Histogram:
        return replace(self, counts=list(self.counts))

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
    if len(gaps) == 0:
        return True
    # The P99 interpolates between two gaps, so it is at most the largest: when that one is within
    # the SLO (most requests), the percentile (some 40 µs a request) cannot change the answer.
    if gaps.max() <= request.tbt_slo_s:
        return True
    return float(np.percentile(gaps, 99)) <= request.tbt_slo_s


@dataclass
class EngineMetrics:
    """Cumulative counts since the engine started."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    request_success: dict[str, int] = field(default_factory=dict)  # by finish reason
    aborted: dict[str, int] = field(default_factory=dict)  # aborted requests by reason: client, timeout, server
    slo_met: int = 0  # requests that finished (stop/length) within their SLOs
    slo_ended: int = 0  # requests that ended, whatever the reason (updated by the engine's thread)
    slo_refused: int = 0  # requests refused for a full queue (updated under the engine's counts lock)
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
        self.slo_ended += 1
        if reason in ("stop", "length"):
            self.e2e_request_latency.observe(now - request.arrival_time)
            self.slo_met += meets_slo(request)
        elif reason == "abort":
            why = request.abort_reason or "client"
            self.aborted[why] = self.aborted.get(why, 0) + 1

    def on_refused(self) -> None:
        """A request refused because the waiting queue was full: a miss (the benchmark counts it)."""
        self.slo_refused += 1

    def copy(self) -> EngineMetrics:
        """An independent copy, far cheaper than `copy.deepcopy`."""
        histograms = {
            name: getattr(self, name).copy()
            for name in ("time_to_first_token", "inter_token_latency", "e2e_request_latency", "scheduler_iteration")
        }
        return replace(self, request_success=dict(self.request_success), aborted=dict(self.aborted), **histograms)

    @property
    def slo_judged(self) -> int:
        """The attainment's denominator: every ended request and every queue-full refusal."""
        return self.slo_ended + self.slo_refused

    @property
    def slo_attainment(self) -> float | None:
        return self.slo_met / self.slo_judged if self.slo_judged else None
