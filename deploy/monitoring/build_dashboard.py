"""Writes grafana-dashboard.json, the Apt-Serve Grafana dashboard: `python deploy/monitoring/build_dashboard.py`.

The JSON is committed so that it can be imported as is; tests/test_dashboard_metrics.py checks that it is
this script's output and that every metric it queries is on a live /metrics page (cluster/metrics.py).
Panels are written once here rather than as ~800 lines of hand-kept JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).with_name("grafana-dashboard.json")
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
MODEL = 'model=~"$model"'
WINDOW = "$__rate_interval"  # Grafana's rate window: at least four scrape intervals
PER_REPLICA = "model, replica"  # replica names repeat across models
# The SLOs are settings (scheduler.ttft_slo_s / tbt_slo_s), not metrics: the lines come from these variables.
SLO_DEFAULTS = {"ttft_slo_s": "5", "tbt_slo_s": "1"}  # configs/default.yaml


def rate(metric: str, by: str = "", matchers: str = "") -> str:
    selector = ",".join(part for part in (MODEL, matchers) if part)
    grouping = f" by ({by}) " if by else ""
    return f"sum{grouping}(rate(aptserve:{metric}{{{selector}}}[{WINDOW}]))"


def quantile(q: float, histogram: str) -> str:
    return f"histogram_quantile({q}, {rate(histogram + '_bucket', by='le')})"


def attainment(window: str = WINDOW) -> str:
    met, judged = (f"sum(rate(aptserve:{name}{{{MODEL}}}[{window}]))"
                   for name in ("requests_slo_met_total", "requests_slo_judged_total"))
    return f"{met} / {judged}"


def gauge(metric: str, by: str = PER_REPLICA) -> str:
    return f"sum by ({by}) (aptserve:{metric}{{{MODEL}}})"


def target(expr: str, legend: str) -> dict:
    return {"expr": expr, "legendFormat": legend}


def panel(kind: str, title: str, description: str, targets: list[dict], unit: str, **field: object) -> dict:
    defaults: dict = {"unit": unit, **field}
    if kind == "timeseries":
        defaults["custom"] = {"lineWidth": 1, "fillOpacity": 10, "showPoints": "never"}
    return {
        "type": kind, "title": title, "description": description, "datasource": DATASOURCE,
        "targets": [dict(t, refId=chr(ord("A") + i), datasource=DATASOURCE) for i, t in enumerate(targets)],
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}}
        if kind == "timeseries" else {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "value"},
    }


# The series named SLO: a dashed red line, not filled.
SLO_LINE = {
    "matcher": {"id": "byName", "options": "SLO"},
    "properties": [
        {"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}},
        {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
        {"id": "custom.fillOpacity", "value": 0},
    ],
}
# Block counts are thousands while failed steps per second are near zero: a second axis.
BLOCKS_RIGHT = {
    "matcher": {"id": "byRegexp", "options": "^blocks"},
    "properties": [{"id": "custom.axisPlacement", "value": "right"}],
}


def latency_vs_slo(title: str, histogram: str, variable: str, description: str) -> dict:
    targets = [target(quantile(q, histogram), f"p{round(q * 100)}") for q in (0.5, 0.9, 0.99)]
    targets.append(target(f"vector(${variable})", "SLO"))
    result = panel("timeseries", title, description, targets, "s")
    result["fieldConfig"]["overrides"].append(SLO_LINE)
    return result


def row(title: str) -> dict:
    return {"type": "row", "title": title, "collapsed": False, "panels": []}


def panels() -> list[dict]:
    """Rows of panels, top to bottom; each row's panels share its width."""
    stats = [
        panel("stat", "Requests / s", "Requests finished per second (every finish reason).",
              [target(rate("request_success_total"), "")], "reqps"),
        panel("stat", "SLO attainment", "Share of finished requests that met their TTFT and P99 TBT SLOs.",
              [target(attainment(), "")], "percentunit", min=0, max=1,
              thresholds={"mode": "absolute", "steps": [{"color": "red", "value": None},
                                                        {"color": "orange", "value": 0.7},
                                                        {"color": "green", "value": 0.9}]}),
        panel("stat", "TTFT p99", "99th percentile time to first token.",
              [target(quantile(0.99, "time_to_first_token_seconds"), "")], "s"),
        panel("stat", "TBT p99", "99th percentile time between tokens.",
              [target(quantile(0.99, "inter_token_latency_seconds"), "")], "s"),
        panel("stat", "Running", "Requests holding cache blocks.",
              [target(f"sum(aptserve:num_requests_running{{{MODEL}}})", "")], "short"),
        panel("stat", "Waiting", "Requests waiting to be admitted (new or preempted).",
              [target(f"sum(aptserve:num_requests_waiting{{{MODEL}}})", "")], "short"),
        panel("stat", "Replicas up", "Engine replicas that answer and whose engine loop runs (aptserve:up); a "
              "dead or restarting replica counts 0 and shows none of its other series.",
              [target(f"sum(aptserve:up{{{MODEL}}})", "")], "short",
              thresholds={"mode": "absolute", "steps": [{"color": "red", "value": None},
                                                        {"color": "green", "value": 1}]}),
    ]
    traffic = [
        panel("timeseries", "Requests / s", "Finished requests by finish reason, aborted ones by why (client, "
              "timeout, server), and refused ones by reason (queue_full and unavailable answer 503).",
              [target(rate("request_success_total", by="finished_reason"), "{{finished_reason}}"),
               target(rate("requests_aborted_total", by="reason"), "aborted: {{reason}}"),
               target(rate("requests_rejected_total", by="reason"), "rejected: {{reason}}")], "reqps"),
        panel("timeseries", "Tokens / s", "Generated and prompt tokens per second; generated tokens by the "
              "cache type their request held.",
              [target(rate("generation_tokens_total"), "generated"),
               target(rate("prompt_tokens_total"), "prompt"),
               target(rate("generation_tokens_by_cache_type_total", by="cache_type"), "generated, {{cache_type}}")],
              "tps"),
    ]
    latency = [
        latency_vs_slo("Time to first token vs SLO", "time_to_first_token_seconds", "ttft_slo_s",
                       "TTFT percentiles; the dashed line is the TTFT SLO (the ttft_slo_s variable)."),
        latency_vs_slo("Time between tokens vs SLO", "inter_token_latency_seconds", "tbt_slo_s",
                       "Percentiles of every gap between tokens; a request meets its SLO when its own P99 "
                       "gap is under the line (the tbt_slo_s variable)."),
        panel("timeseries", "SLO attainment", "Share of requests finished in the window that met both SLOs, "
              "and each replica's share since it started.",
              [target(attainment(), "window"),
               target(f"avg by ({PER_REPLICA}) (aptserve:slo_attainment{{{MODEL}}})", "since start: {{replica}}")],
              "percentunit", min=0, max=1),
    ]
    cache = [
        panel("timeseries", "Running and waiting requests", "Per engine replica.",
              [target(gauge("num_requests_running"), "running: {{replica}}"),
               target(gauge("num_requests_waiting"), "waiting: {{replica}}")], "short"),
        panel("timeseries", "KV and hidden cache usage", "Share of each replica's cache blocks holding KV "
              "requests and hidden-state (x) requests.",
              [target(gauge("kv_cache_usage_perc"), "KV: {{replica}}"),
               target(gauge("hidden_cache_usage_perc"), "hidden: {{replica}}")], "percentunit", min=0, max=1),
        panel("timeseries", "Running requests by cache type", "How many running requests hold each cache type.",
              [target(gauge("num_requests_by_cache_type", by="cache_type"), "{{cache_type}}")], "short"),
        panel("timeseries", "Preemptions and conversions / s", "Preempted requests (cache freed, re-prefilled "
              "later) and hidden-to-KV conversions in place.",
              [target(rate("num_preemptions_total", by=PER_REPLICA), "preemptions: {{replica}}"),
               target(rate("num_conversions_total", by=PER_REPLICA), "conversions: {{replica}}")], "ops"),
    ]
    scheduler = [
        panel("timeseries", "Scheduler time per iteration", "Policy and bookkeeping time per engine iteration "
              "(the model's step excluded).",
              [target(quantile(0.5, "scheduler_iteration_seconds"), "p50"),
               target(quantile(0.99, "scheduler_iteration_seconds"), "p99"),
               target(f"{rate('scheduler_iteration_seconds_sum')} / {rate('scheduler_iteration_seconds_count')}",
                      "mean")], "s"),
        panel("timeseries", "Engine time by part", "Share of wall time each replica's engine spends per part "
              "of a step: scheduling, the executor call (execute), the model within it, attention within the "
              "model, recompute within attention.",
              [target(rate("step_seconds_total", by="part"), "{{part}}")], "percentunit"),
        panel("timeseries", "End-to-end latency", "Arrival to last token of finished requests.",
              [target(quantile(0.5, "e2e_request_latency_seconds"), "p50"),
               target(quantile(0.99, "e2e_request_latency_seconds"), "p99")], "s"),
        panel("timeseries", "Recompute cost α", "Seconds of K/V recompute per block of hidden history per "
              "step, measured at start-up; the apt policy's cost model.",
              [target(gauge("recompute_seconds_per_block"), "{{replica}}")], "s"),
        panel("timeseries", "Failed steps / s and cache blocks", "Steps lost to a worker failure (the group "
              "is rebuilt), and each replica's cache size in blocks (right axis).",
              [target(rate("num_failed_steps_total", by=PER_REPLICA), "failed steps: {{replica}}"),
               target(gauge("num_cache_blocks"), "blocks: {{replica}}")], "short"),
    ]
    scheduler[-1]["fieldConfig"]["overrides"].append(BLOCKS_RIGHT)
    scheduler.append(panel("timeseries", "Engine replicas up", "1 while a replica answers and its engine loop runs, "
                           "0 while it is dead or restarting (Ray restarts it; the router skips it meanwhile).",
                           [target(gauge("up"), "{{replica}}")], "short", min=0, max=1))
    laid_out: list[dict] = []
    y = 0
    for title, group, height in (("Overview", stats, 4), ("Traffic", traffic, 8), ("Latency and SLOs", latency, 8),
                                 ("Queue and cache", cache, 8), ("Scheduler and engine", scheduler, 8)):
        laid_out.append(row(title) | {"gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        y += 1
        width = 24 // len(group)
        for i, item in enumerate(group):
            laid_out.append(item | {"gridPos": {"h": height, "w": width, "x": i * width, "y": y}})
        y += height
    return [item | {"id": i + 1} for i, item in enumerate(laid_out)]


def variables() -> list[dict]:
    models = "label_values(aptserve:num_requests_running, model)"
    return [
        {"type": "datasource", "name": "datasource", "label": "Data source", "query": "prometheus"},
        {"type": "query", "name": "model", "label": "Model", "datasource": DATASOURCE, "definition": models,
         "query": {"query": models, "refId": "models"}, "refresh": 2, "multi": True, "includeAll": True,
         "allValue": ".*", "current": {"text": "All", "value": "$__all"}},
        *({"type": "textbox", "name": name, "label": label, "query": SLO_DEFAULTS[name],
           "current": {"text": SLO_DEFAULTS[name], "value": SLO_DEFAULTS[name]}}
          for name, label in (("ttft_slo_s", "TTFT SLO (s)"), ("tbt_slo_s", "TBT SLO (s)"))),
    ]


def dashboard() -> dict:
    return {
        "uid": "aptserve", "title": "Apt-Serve", "tags": ["aptserve", "llm", "ray-serve"],
        "description": "Apt-Serve engines: traffic, latency against the SLOs, queue, hybrid cache, scheduler.",
        "editable": True, "schemaVersion": 39, "version": 1, "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s", "timezone": "browser", "graphTooltip": 1,
        "templating": {"list": variables()}, "annotations": {"list": []}, "panels": panels(),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
