"""One Prometheus page for every engine replica, rendered by the ingress from the replicas' stats.

Engines keep plain counters and histograms (`scheduler_service/metrics.py`); a prometheus-client
registry inside an actor would be invisible here, so the ingress asks each replica for its stats
and renders them with `model` and `replica` labels.

A replica that is down (dead, restarting, or its engine loop stopped) shows `up 0` and none of its other
series: its last numbers are not served as if it were alive. Requests the ingress refuses itself
(before any engine sees them) are counted here, under `replica="ingress"`; engines count their own.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from scheduler_service.engine import ABORT_REASONS
from scheduler_service.metrics import Histogram
from scheduler_service.stats import EngineStats

PREFIX = "aptserve:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# name → help, for every metric this page can hold (the dashboard and alert tests read this list).
METRICS = {
    "up": "1 if the engine replica answers and its engine loop runs; 0 if it is dead, restarting or stopped.",
    "num_requests_running": "Requests holding cache blocks (running).",
    "num_requests_waiting": "Requests waiting to be admitted (new or preempted).",
    "kv_cache_usage_perc": "Fraction of cache blocks holding KV requests.",
    "hidden_cache_usage_perc": "Fraction of cache blocks holding hidden-state (x) requests.",
    "num_requests_by_cache_type": "Running requests by the cache type they hold.",
    "num_cache_blocks": "Cache blocks of this replica.",
    "recompute_seconds_per_block": "Alpha: seconds of K/V recompute per block of hidden history per step.",
    "step_time_model_seconds": "The start-up step-time model apt sizes prompt chunks by, one series per term: "
    "intercept (seconds), per_token, per_context (per attended key), per_sequence.",
    "step_time_predicted_seconds_total": "Predicted duration of the steps the engine ran (apt's step-time model).",
    "step_time_measured_seconds_total": "Measured duration of the same steps.",
    "step_time_abs_error_seconds_total": "Summed |predicted - measured| over the same steps.",
    "step_time_scale": "The online correction the step-time model's predictions are multiplied by: median measured "
    "÷ start-up model over the recent steps (1 with scheduler.step_time_adapt off).",
    "step_time_median_rel_error": "Median |predicted - measured| / measured over the recent steps (NaN before any).",
    "slo_attainment": "Share of judged requests that met their TTFT and P99 TBT SLOs (NaN before any).",
    "requests_slo_met_total": "Requests that finished (stop or length) within their TTFT and P99 TBT SLOs.",
    "requests_slo_judged_total": "Requests judged against the SLOs: every request the engine accepted, once ended "
    "(any finish reason: timeouts, aborts and errors are misses), and every queue-full refusal.",
    "num_preemptions_total": "Requests preempted (their cache freed, re-prefilled later).",
    "num_conversions_total": "Hidden-to-KV conversions in place.",
    "num_prefills_total": "Prompts prefilled: requests admitted from the waiting queue (re-admissions after "
    "preemption included; a forked sample shares its prompt's prefill).",
    "num_forked_samples_total": "Parallel samples (n / best_of > 1) forked from a prefilled prompt.",
    "num_failed_steps_total": "Steps lost to a worker failure.",
    "prompt_tokens_total": "Prompt tokens prefilled (counted at each request's first token).",
    "generation_tokens_total": "Tokens generated.",
    "generation_tokens_by_cache_type_total": "Tokens generated, by the cache type their request held.",
    "request_success_total": "Requests ended, by finish reason (stop, length, abort, error).",
    "requests_aborted_total": "Requests aborted, by reason: client (went away or asked), timeout "
    "(server.request_timeout_s), server (its caller vanished).",
    "requests_rejected_total": "Requests refused, by reason: by an engine at admission (invalid, queue_full), or "
    "by the ingress before any engine (replica=\"ingress\": invalid, not_found, too_large, already_exists, "
    "unavailable).",
    "time_to_first_token_seconds": "Time from the ingress's receipt of the request to its first token.",
    "inter_token_latency_seconds": "Time between consecutive tokens of a request.",
    "e2e_request_latency_seconds": "Time from arrival to the last token of finished requests.",
    "scheduler_iteration_seconds": "Scheduler time per engine iteration (policy and bookkeeping).",
    "step_seconds_total": "Engine time by part: scheduling; execute (the executor call, Ray included); model "
    "(rank 0's forward and sampling, within execute); attention (within model); recompute (within attention).",
}


INGRESS = "ingress"  # the replica label of the ingress's own counters


class IngressCounters:
    """Requests the ingress refused itself, by reason; incremented from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rejected: Counter[str] = Counter()

    def reject(self, reason: str) -> None:
        with self._lock:
            self._rejected[reason] += 1

    def rejected(self) -> dict[str, int]:
        with self._lock:
            return dict(self._rejected)


def _histogram(name: str, labels: list[str], values: list[str], hist: Histogram, family: dict) -> None:
    metric = family.setdefault(name, HistogramMetricFamily(PREFIX + name, METRICS[name], labels=labels))
    buckets = [("+Inf" if bound == float("inf") else repr(bound), count) for bound, count in hist.cumulative()]
    metric.add_metric(values, buckets, hist.sum)


class _ReplicaCollector(Collector):
    def __init__(
        self, model: str, replicas: Iterable[tuple[str, EngineStats | None]], ingress: dict[str, int]
    ) -> None:
        self.model, self.replicas, self.ingress = model, list(replicas), ingress

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}

        def gauge(name: str, value: float, extra: dict[str, str] | None = None) -> None:
            keys = ["model", "replica", *(extra or {})]
            metric = families.setdefault(name, GaugeMetricFamily(PREFIX + name, METRICS[name], labels=keys))
            metric.add_metric([self.model, replica, *(extra or {}).values()], value)

        def counter(name: str, value: float, extra: dict[str, str] | None = None) -> None:
            keys = ["model", "replica", *(extra or {})]
            family = name.removesuffix("_total")
            metric = families.setdefault(name, CounterMetricFamily(PREFIX + family, METRICS[name], labels=keys))
            metric.add_metric([self.model, replica, *(extra or {}).values()], value)

        for replica, stats in self.replicas:
            up = stats is not None and stats.healthy
            gauge("up", 1 if up else 0)
            if not up:
                continue
            cache, metrics = stats.cache, stats.metrics
            gauge("num_requests_running", stats.num_running)
            gauge("num_requests_waiting", stats.num_waiting)
            gauge("kv_cache_usage_perc", cache.kv_blocks / cache.num_blocks)
            gauge("hidden_cache_usage_perc", cache.hidden_blocks / cache.num_blocks)
            gauge("num_requests_by_cache_type", cache.kv_requests, {"cache_type": "kv"})
            gauge("num_requests_by_cache_type", cache.hidden_requests, {"cache_type": "hidden"})
            gauge("num_cache_blocks", cache.num_blocks)
            gauge("recompute_seconds_per_block", stats.alpha)
            report = stats.step_time
            if report.model is not None:
                model = report.model
                terms = {"intercept": model.intercept_seconds, "per_token": model.seconds_per_token,
                         "per_context": model.seconds_per_context, "per_sequence": model.seconds_per_sequence}
                for term, value in terms.items():
                    gauge("step_time_model_seconds", value, {"term": term})
            gauge("step_time_scale", report.scale)
            counter("step_time_predicted_seconds_total", report.predicted_seconds)
            counter("step_time_measured_seconds_total", report.measured_seconds)
            counter("step_time_abs_error_seconds_total", report.abs_error_seconds)
            median = report.median_rel_error
            gauge("step_time_median_rel_error", float("nan") if median is None else median)
            attainment = metrics.slo_attainment
            gauge("slo_attainment", float("nan") if attainment is None else attainment)
            counter("requests_slo_met_total", metrics.slo_met)
            counter("requests_slo_judged_total", metrics.slo_judged)
            counter("num_preemptions_total", stats.num_preemptions)
            counter("num_conversions_total", stats.num_conversions)
            counter("num_prefills_total", stats.num_prefills)
            counter("num_forked_samples_total", stats.num_forked_samples)
            counter("num_failed_steps_total", stats.num_failed_steps)
            counter("prompt_tokens_total", metrics.prompt_tokens)
            counter("generation_tokens_total", metrics.generation_tokens)
            for cache_type, tokens in stats.tokens_by_cache_type.items():
                counter("generation_tokens_by_cache_type_total", tokens, {"cache_type": cache_type})
            for reason in ("stop", "length", "abort", "error"):
                counter("request_success_total", metrics.request_success.get(reason, 0), {"finished_reason": reason})
            for reason in ABORT_REASONS:
                counter("requests_aborted_total", metrics.aborted.get(reason, 0), {"reason": reason})
            for reason, count in stats.num_rejected.items():
                counter("requests_rejected_total", count, {"reason": reason})
            for part in ("scheduling", "execute", "model", "attention", "recompute"):
                counter("step_seconds_total", stats.step_seconds.get(part, 0.0), {"part": part})
            labels, values = ["model", "replica"], [self.model, replica]
            _histogram("time_to_first_token_seconds", labels, values, metrics.time_to_first_token, families)
            _histogram("inter_token_latency_seconds", labels, values, metrics.inter_token_latency, families)
            _histogram("e2e_request_latency_seconds", labels, values, metrics.e2e_request_latency, families)
            _histogram("scheduler_iteration_seconds", labels, values, metrics.scheduler_iteration, families)
        replica = INGRESS
        for reason, count in sorted(self.ingress.items()):
            counter("requests_rejected_total", count, {"reason": reason})
        yield from families.values()


def render(
    model: str, replicas: Iterable[tuple[str, EngineStats | None]], ingress: dict[str, int] | None = None
) -> bytes:
    """The Prometheus text page for these (replica name, stats or None when down) pairs and the
    ingress's own rejections."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ReplicaCollector(model, replicas, ingress or {}))
    return generate_latest(registry)
