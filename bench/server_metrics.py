"""What a server's `/metrics` page says about a benchmark run, and where the run's time went.

Both servers' pages are read the same way: our `aptserve:` series and vLLM's `vllm:` series land on
one set of keys (cache blocks, preemptions, generated tokens, engine-side end-to-end latency). Ours
adds the hidden-cache token share and the engine's time by part (`aptserve:step_seconds_total`).
"""

from __future__ import annotations

from pathlib import Path

import httpx

from bench.slo_metrics import RequestRecord

# key → the series summed into it (over every label set; the counters cover the whole server life,
# warm-up included).
SERVER_COUNTERS: dict[str, tuple[str, ...]] = {
    "num_cache_blocks": ("aptserve:num_cache_blocks",),
    "preemptions": ("aptserve:num_preemptions_total", "vllm:num_preemptions_total"),
    "conversions": ("aptserve:num_conversions_total",),
    "generation_tokens": ("aptserve:generation_tokens_total", "vllm:generation_tokens_total"),
    "engine_e2e_seconds_sum": ("aptserve:e2e_request_latency_seconds_sum", "vllm:e2e_request_latency_seconds_sum"),
    "engine_e2e_count": ("aptserve:e2e_request_latency_seconds_count", "vllm:e2e_request_latency_seconds_count"),
}
STEP_PARTS = ("scheduling", "execute", "model", "attention", "recompute")


def parse_metrics(text: str) -> dict[str, float]:
    """The keys of `SERVER_COUNTERS`, `hidden_token_share`, `step_seconds_<part>`, and the step-time model's
    `step_time_median_rel_error` and `step_time_scale` found in a page."""
    found: dict[str, float] = {}

    def add(key: str, value: float) -> None:
        found[key] = found.get(key, 0.0) + value

    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        sample, _, raw = line.rpartition(" ")
        name, value = sample.split("{", 1)[0], float(raw)
        for key, wanted in SERVER_COUNTERS.items():
            if name in wanted:
                add(key, value)
        if name == "aptserve:generation_tokens_by_cache_type_total" and 'cache_type="hidden"' in sample:
            add("hidden_generation_tokens", value)
        if name == "aptserve:step_seconds_total":
            add("step_seconds_" + sample.split('part="', 1)[1].split('"', 1)[0], value)
        if name in ("aptserve:step_time_median_rel_error", "aptserve:step_time_scale"):
            found[name.removeprefix("aptserve:")] = value  # gauges of the one engine replica benchmarked
        if name == "vllm:cache_config_info" and 'num_gpu_blocks="' in sample:
            found["num_cache_blocks"] = float(sample.split('num_gpu_blocks="', 1)[1].split('"', 1)[0])
    if "hidden_generation_tokens" in found and found.get("generation_tokens"):
        found["hidden_token_share"] = found.get("hidden_generation_tokens", 0.0) / found["generation_tokens"]
    return found


def scrape_metrics(base: str, path: Path | None = None) -> dict[str, float]:
    """Parse the server's /metrics page (`parse_metrics`), saving it to `path` if one is given."""
    try:
        text = httpx.get(f"{base}/metrics", timeout=30).text
    except httpx.HTTPError as err:
        return {"error": str(err)}  # type: ignore[dict-item]
    if path is not None:
        path.write_text(text)
    return parse_metrics(text)


def counters_since(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    """What the counters of `after` added since `before` (the probes alone, without warm-up)."""
    return {key: value - before.get(key, 0.0) for key, value in after.items()
            if key not in ("num_cache_blocks", "hidden_token_share", "error")}


def time_split(metrics: dict[str, float], records: list[RequestRecord]) -> dict[str, float]:
    """Where a run's time went, from the server's counters over the run (`counters_since`) and the
    client's records of the same requests.

    `serving_overhead_ms` is the client's mean end-to-end latency of finished requests minus the
    engine's: HTTP (and Serve's proxy, with `server.ingress: proxy`), routing, streaming and
    detokenizing (for either system). Ours add the engine's seconds by part; `executor_overhead_s` is
    the executor call's time outside rank 0's model step (Ray's plan transfer and result return).
    """
    split: dict[str, float] = {}
    client = [r.token_times[-1] - r.arrival for r in records if r.finished and r.token_times]
    count = metrics.get("engine_e2e_count", 0.0)
    if client and count:
        engine_mean = metrics["engine_e2e_seconds_sum"] / count
        split["serving_overhead_ms"] = 1000 * (sum(client) / len(client) - engine_mean)
    parts = {part: metrics[f"step_seconds_{part}"] for part in STEP_PARTS if f"step_seconds_{part}" in metrics}
    if parts:
        split |= {f"{part}_s": seconds for part, seconds in parts.items()}
        split["executor_overhead_s"] = parts.get("execute", 0.0) - parts.get("model", 0.0)
    return split


def time_split_table(results: dict[str, dict]) -> str:
    """A Markdown table of each system's `time_split` and hidden-cache token share."""
    parts = (*STEP_PARTS, "executor_overhead")
    lines = ["Where the time went over the probes (seconds, unless marked):", "",
             "| system | " + " | ".join(parts).replace("_", " ") + " | serving overhead (ms/request) "
             "| hidden token share |",
             "| --- |" + " ---: |" * (len(parts) + 2)]
    for name, result in results.items():
        split, metrics = result.get("time_split", {}), result.get("server_metrics", {})
        cells = [split.get(f"{part}_s") for part in parts] + [split.get("serving_overhead_ms")]
        share = metrics.get("hidden_token_share")
        text = ["" if c is None else f"{c:.1f}" for c in cells] + ["" if share is None else f"{share:.1%}"]
        lines.append(f"| {name} | " + " | ".join(text) + " |")
    return "\n".join(lines) + "\n"
