"""Per-request latency records and the SLO metrics of docs/BENCHMARK_METHOD.md.

Definitions (all times in seconds, relative to the same clock as `arrival`):

- TTFT = first token time − arrival; E2E = last token time − arrival.
- Gaps (ITL) = differences between consecutive token times; the first token's wait is TTFT, not a gap.
- TPOT = (E2E − TTFT) / (n_out − 1), undefined for fewer than two tokens.
- P99 (and every percentile here) = `numpy.percentile(values, q, method="linear")`: the value at rank
  q/100·(n − 1) of the sorted values, linearly interpolated between neighbours. For one value it is
  that value; for 2..100 values P99 lies between the two largest.
- Paper SLO attainment: TTFT ≤ TTFT-SLO and P99 of the request's own gaps ≤ TBT-SLO.
- vLLM-style goodput: TTFT ≤ TTFT-SLO and TPOT ≤ TBT-SLO.
- A request that errored, did not finish or produced no token misses both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation (numpy's default), or None for no values."""
    if len(values) == 0:
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q, method="linear"))


@dataclass
class RequestRecord:
    """What a client observed for one request; times are seconds on one clock shared with `arrival`."""

    request_id: str
    arrival: float
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    finished: bool = False
    error: str | None = None
    prompt_len: int = 0
    output_len: int = 0

    @property
    def num_tokens(self) -> int:
        """Output tokens observed (one timestamp each)."""
        return len(self.token_times)

    @property
    def ttft(self) -> float | None:
        """Time to first token, or None if no token came."""
        first = self.first_token_time
        if first is None and self.token_times:
            first = self.token_times[0]
        return None if first is None else first - self.arrival

    @property
    def gaps(self) -> list[float]:
        """Inter-token gaps: one per token after the first."""
        t = self.token_times
        return [t[i] - t[i - 1] for i in range(1, len(t))]

    @property
    def e2e(self) -> float | None:
        """Arrival to last token, or None if no token came."""
        return self.token_times[-1] - self.arrival if self.token_times else None

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first: (E2E − TTFT)/(n − 1); None for fewer than 2 tokens."""
        ttft, e2e = self.ttft, self.e2e
        if self.num_tokens < 2 or ttft is None or e2e is None:
            return None
        return (e2e - ttft) / (self.num_tokens - 1)

    @property
    def ok(self) -> bool:
        """Finished without error and produced at least one token: eligible to meet an SLO."""
        return self.finished and self.error is None and self.num_tokens > 0 and self.ttft is not None


@dataclass(frozen=True)
class SLO:
    """Latency targets in seconds: time to first token, and time between tokens."""

    ttft_s: float
    tbt_s: float


def meets_paper_slo(record: RequestRecord, slo: SLO) -> bool:
    """Paper attainment: TTFT ≤ slo.ttft_s and P99 of the request's own gaps ≤ slo.tbt_s.

    A one-token request has no gaps, so only its TTFT counts; errors, unfinished and empty requests miss.
    """
    if not record.ok or record.ttft > slo.ttft_s:  # type: ignore[operator]  # ok implies ttft is set
        return False
    p99 = percentile(record.gaps, 99)
    return p99 is None or p99 <= slo.tbt_s


def meets_goodput_slo(record: RequestRecord, slo: SLO) -> bool:
    """vLLM goodput: TTFT ≤ slo.ttft_s and TPOT ≤ slo.tbt_s (TPOT undefined: TTFT only); misses as above."""
    if not record.ok or record.ttft > slo.ttft_s:  # type: ignore[operator]
        return False
    tpot = record.tpot
    return tpot is None or tpot <= slo.tbt_s


def summarize(records: Sequence[RequestRecord], slo: SLO, duration_s: float) -> dict[str, float | int | None]:
    """Aggregate metrics over a run; every value is an int, float or None (no data), so it is JSON-ready.

    Fractions are over all requests; rates divide by `duration_s`. Latency percentiles use the requests
    that finished without error (ITL pools all their gaps). Keys end in `_s` for seconds.
    """
    if not (duration_s > 0 and math.isfinite(duration_s)):
        raise ValueError(f"duration_s must be a finite number > 0, got {duration_s!r}")
    count = len(records)
    good = [r for r in records if r.ok]
    attained = sum(meets_paper_slo(r, slo) for r in records)
    goodput = sum(meets_goodput_slo(r, slo) for r in records)
    ttfts = [r.ttft for r in good]
    tpots = [t for t in (r.tpot for r in good) if t is not None]
    itls = [g for r in good for g in r.gaps]
    out: dict[str, float | int | None] = {
        "count": count,
        "finished": sum(r.finished for r in records),
        "errors": sum(r.error is not None for r in records),
        "attainment": attained / count if count else 0.0,
        "goodput_fraction": goodput / count if count else 0.0,
        "goodput_rps": goodput / duration_s,
        "throughput_rps": len(good) / duration_s,
        "output_tok_per_s": sum(r.num_tokens for r in records) / duration_s,
        "duration_s": float(duration_s),
        "ttft_slo_s": float(slo.ttft_s),
        "tbt_slo_s": float(slo.tbt_s),
    }
    for name, values, qs in (("ttft", ttfts, (50, 90, 99)), ("tpot", tpots, (50, 90, 99)), ("itl", itls, (50, 99))):
        for q in qs:
            out[f"{name}_p{q}_s"] = percentile(values, q)  # type: ignore[arg-type]
    return out


def effective_throughput(attainment_by_rate: Mapping[float, float], target: float = 0.9) -> float | None:
    """The highest rate r such that every probed rate ≤ r has attainment ≥ target; None if the lowest fails.

    This monotone envelope ignores a passing rate above a failing one (noise), so the answer is a rate
    the system sustained together with all lighter loads.
    """
    best = None
    for rate in sorted(attainment_by_rate):
        if attainment_by_rate[rate] >= target:
            best = rate
        else:
            break
    return best


def bisect_rate(measure: Callable[[float], float], low: float, high: float, target: float = 0.9,
                iterations: int = 6) -> tuple[float, dict[float, float]]:
    """Bisect for the effective throughput of `measure` (rate → attainment) between `low` and `high`.

    Probes `low` and `high` first: if `low` misses the target the answer is 0.0 (no passing rate); if
    `high` meets it the answer is `high`. Otherwise `iterations` midpoints narrow [pass, fail], and the
    highest passing rate is returned with every probe (rate → attainment). Assumes attainment falls
    with the rate; after `iterations` steps the answer is within (high − low)/2^iterations of the threshold.
    """
    if not (0 < low < high) or not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"need 0 < low < high, got low={low!r}, high={high!r}")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    probes: dict[float, float] = {}

    def probe(rate: float) -> bool:
        probes[rate] = float(measure(rate))
        return probes[rate] >= target

    if not probe(low):
        return 0.0, probes
    if probe(high):
        return high, probes
    passing, failing = low, high
    for _ in range(iterations):
        mid = (passing + failing) / 2
        if probe(mid):
            passing = mid
        else:
            failing = mid
    return passing, probes


def attainment_table(results: Iterable[tuple[float, Sequence[RequestRecord]]], slo: SLO) -> dict[float, float]:
    """Paper attainment per rate from (rate, records) runs, for `effective_throughput`."""
    return {rate: (sum(meets_paper_slo(r, slo) for r in recs) / len(recs) if recs else 0.0) for rate, recs in results}
