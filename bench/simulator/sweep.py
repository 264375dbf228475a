"""Rate sweeps on the simulator: seeded workloads, unloaded latency, attainment by rate, effective throughput.

The definitions are `bench.slo_metrics`'s (paper attainment, 90% effective throughput, bisection) and
the arrivals `bench.traces`'s (Gamma gaps), so a simulated sweep reads like a measured one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from bench.datasets import Sample, load_samples
from bench.simulator.api import SimConfig, simulate
from bench.simulator.loop import TraceRequest
from bench.slo_metrics import SLO, attainment_table, bisect_rate, effective_throughput, percentile, summarize
from bench.traces import arrival_times

DEFAULT_TOKENIZER = Path(__file__).resolve().parents[2] / "data" / "models" / "SmolLM2-135M-Instruct"


@lru_cache(maxsize=8)
def dataset_lengths(dataset: str, num: int, seed: int, max_prompt: int | None, max_total: int | None,
                    tokenizer: str = str(DEFAULT_TOKENIZER)) -> tuple[Sample, ...]:
    """`num` seeded samples of a dataset (`bench.datasets` names), measured with `tokenizer`."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    filters = {} if dataset.startswith("synthetic:") else {"max_prompt": max_prompt, "max_total": max_total}
    return tuple(load_samples(dataset, lambda text: tok(text)["input_ids"], num, seed, progress=False, **filters))


def workload(samples: Sequence[Sample], rate: float, cv: float, seed: int) -> list[TraceRequest]:
    """The samples arriving at `rate` req/s with Gamma gaps of coefficient of variation `cv`."""
    times = arrival_times(rate, cv, len(samples), seed)
    return [TraceRequest(s.prompt_len, s.output_len, t) for s, t in zip(samples, times)]


@dataclass(frozen=True)
class Unloaded:
    """Median TTFT and TPOT (s) of requests served one at a time: the base SLO scales multiply."""

    ttft_s: float
    tpot_s: float


def unloaded(config: SimConfig, samples: Sequence[Sample], count: int = 50) -> Unloaded:
    """Simulate `count` samples each alone (arrivals 10⁴ s apart) and take the medians."""
    alone = [TraceRequest(s.prompt_len, s.output_len, 1e4 * i) for i, s in enumerate(samples[:count])]
    records = simulate(config.model_copy(update={"policy": "fcfs", "cache": "kv"}), alone).records
    tpots = [r.tpot for r in records if r.tpot is not None]
    return Unloaded(percentile([r.ttft for r in records], 50), percentile(tpots, 50))  # type: ignore[arg-type]


def sweep(config: SimConfig, samples: Sequence[Sample], rates: tuple[float, float] | list[float], cv: float,
          seed: int, slo: SLO, iterations: int = 6, on_probe: Callable[[float, float], None] | None = None,
          rate_map: Callable[[float], float] | None = None, duration_s: float | None = None,
          min_requests: int = 300) -> dict:
    """Attainment by rate (bisection between two bounds, or the listed rates), the effective throughput,
    and each probe's summary. `config`'s SLOs should be `slo` (the apt policy schedules by them).
    With `rate_map`, the bisection runs over x and probes the rate `rate_map(x)` (e.g. log spacing).
    With `duration_s`, a probe uses the first `rate·duration_s` samples (at least `min_requests`, at most
    all): a trace long enough for the load to reach its steady state at every rate."""
    probes: dict[float, dict] = {}
    attainment: dict[float, float] = {}

    def probe(x: float) -> float:
        rate = rate_map(x) if rate_map else x
        count = len(samples) if duration_s is None else int(min(len(samples), max(min_requests, rate * duration_s)))
        load = workload(samples[:count], rate, cv, seed)
        result = simulate(config, load)
        summary = summarize(result.records, slo, max(w.arrival for w in load))
        summary |= {"preemptions": result.num_preemptions, "conversions": result.num_conversions,
                    "tokens_by_cache_type": result.tokens_by_cache_type, "wall_seconds": result.wall_seconds}
        probes[rate] = summary
        attained = attainment[rate] = attainment_table([(rate, result.records)], slo)[rate]
        if on_probe is not None:
            on_probe(rate, attained)
        return attained

    if isinstance(rates, tuple):
        bisect_rate(probe, *rates, target=0.9, iterations=iterations)
    else:
        for rate in rates:
            probe(rate)
    return {"attainment_by_rate": dict(sorted(attainment.items())),
            "effective_throughput": effective_throughput(attainment) or 0.0,
            "probes": {str(k): v for k, v in sorted(probes.items())}}


def mean_lengths(samples: Sequence[Sample]) -> dict[str, float]:
    return {"prompt_len": float(np.mean([s.prompt_len for s in samples])),
            "output_len": float(np.mean([s.output_len for s in samples]))}
