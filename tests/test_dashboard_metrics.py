"""The Grafana dashboard and the alert rules query only what the server exports: every `aptserve:` series
and label in their PromQL must be on a live /metrics page (the HTTP app over a tiny engine, after a request)."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from test_http_server import COMPLETION, running_server, wait_idle

REPO = Path(__file__).resolve().parent.parent
MONITORING = REPO / "deploy" / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"
RULE_FILES = (MONITORING / "aptserve-rules.yaml", MONITORING / "prometheusrule.yaml")
# Labels Prometheus adds to every scraped series (deploy/monitoring relabels pod, namespace, rayservice).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "rayservice"}
# What the dashboard must show (issue 7), each by a series it has to query.
REQUIRED_PANELS = {
    "request rate": "aptserve:request_success_total",
    "TTFT percentiles": "aptserve:time_to_first_token_seconds_bucket",
    "TBT percentiles": "aptserve:inter_token_latency_seconds_bucket",
    "SLO attainment": "aptserve:requests_slo_met_total",
    "running requests": "aptserve:num_requests_running",
    "waiting requests": "aptserve:num_requests_waiting",
    "KV cache usage": "aptserve:kv_cache_usage_perc",
    "hidden cache usage": "aptserve:hidden_cache_usage_perc",
    "requests per cache type": "aptserve:num_requests_by_cache_type",
    "preemptions": "aptserve:num_preemptions_total",
    "conversions": "aptserve:num_conversions_total",
    "scheduler time per iteration": "aptserve:scheduler_iteration_seconds_bucket",
    "tokens/s": "aptserve:generation_tokens_total",
    "engine time by part": "aptserve:step_seconds_total",
    "replicas up": "aptserve:up",
}


@pytest.fixture(scope="module")
def exported(tiny_opt_with_tokenizer: Path) -> dict[str, set[str]]:
    """Series name → its label names, from the running server's /metrics after one served request."""
    with running_server(tiny_opt_with_tokenizer) as (base, engine):
        assert httpx.post(f"{base}/v1/completions", json=COMPLETION, timeout=60).status_code == 200
        wait_idle(engine)
        page = httpx.get(f"{base}/metrics", timeout=30)
    assert page.status_code == 200
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(page.text):
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


# -- reading PromQL ------------------------------------------------------------------------------------


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def grafana_values() -> dict[str, str]:
    """What Grafana puts in place of its variables, so that a query parses as plain PromQL."""
    values = {"$__rate_interval": "5m"}
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "textbox":
            values[f"${variable['name']}"] = variable["query"]
    return values


def dashboard_queries() -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and every variable that queries a metric."""
    values = grafana_values()
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name in sorted(values, key=len, reverse=True):  # `$tbt_slo_s` before any shorter prefix
                expr = expr.replace(name, values[name])
            yield f"panel {panel['title']!r}", expr
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            definition = variable["definition"]
            assert definition.startswith("label_values(") and definition.endswith(")"), definition
            metric, _label = definition[len("label_values("):-1].rsplit(",", 1)
            yield f"variable {variable['name']!r}", metric.strip()


def rule_queries() -> Iterator[tuple[str, str]]:
    for path in RULE_FILES:
        document = yaml.safe_load(path.read_text())
        for group in document.get("spec", document)["groups"]:
            for rule in group["rules"]:
                yield f"{path.name}: {rule.get('alert') or rule.get('record')}", str(rule["expr"])


def walk(node: object) -> Iterator[object]:
    """Every node of a parsed PromQL expression."""
    yield node
    children: list[object] = []
    if isinstance(node, promql_parser.AggregateExpr):
        children = [node.expr, node.param]
    elif isinstance(node, promql_parser.BinaryExpr):
        children = [node.lhs, node.rhs]
    elif isinstance(node, promql_parser.Call):
        children = list(node.args)
    elif isinstance(node, promql_parser.MatrixSelector):
        children = [node.vector_selector]
    elif isinstance(node, (promql_parser.ParenExpr, promql_parser.UnaryExpr, promql_parser.SubqueryExpr)):
        children = [node.expr]
    for child in children:
        if child is not None:
            yield from walk(child)


def selector_name(selector: promql_parser.VectorSelector) -> str | None:
    if selector.name:
        return selector.name
    return next((m.value for m in selector.matchers.matchers if m.name == "__name__"), None)


def used(expr: str) -> Iterator[tuple[str, set[str]]]:
    """(series name, label names the query needs it to carry) for each selector of `expr`."""
    tree = promql_parser.parse(expr)
    for node in walk(tree):
        if isinstance(node, promql_parser.VectorSelector):
            labels = {m.name for m in node.matchers.matchers if m.name != "__name__"}
            yield selector_name(node), labels
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            if node.modifier.type == promql_parser.AggModifierType.By:
                # `sum by (x) (...)`: each series summed must carry x.
                for inner in walk(node.expr):
                    if isinstance(inner, promql_parser.VectorSelector):
                        yield selector_name(inner), set(node.modifier.labels)


def problems(queries: list[tuple[str, str]], exported: dict[str, set[str]]) -> list[str]:
    found = []
    for where, expr in queries:
        for name, labels in used(expr):
            if not (name or "").startswith("aptserve:"):
                found.append(f"{where}: `{name}` is not one of our metrics ({expr})")
            elif name not in exported:
                found.append(f"{where}: `{name}` is not exported")
            elif labels - exported[name] - TARGET_LABELS:
                found.append(f"{where}: `{name}` has no label {sorted(labels - exported[name] - TARGET_LABELS)}")
    return found


# -- the checks ----------------------------------------------------------------------------------------


def test_dashboard_and_alerts_query_only_exported_series(exported: dict[str, set[str]]) -> None:
    queries = [*dashboard_queries(), *rule_queries()]
    assert len(queries) > 30
    assert not problems(queries, exported)


def test_the_check_catches_what_is_not_exported(exported: dict[str, set[str]]) -> None:
    """The check above can fail: a histogram's bare name, a typo and an unknown label are all caught."""
    bad = [("bare histogram", "rate(aptserve:time_to_first_token_seconds[5m])"),
           ("typo", "sum(aptserve:num_request_waiting)"),
           ("label", 'sum by (finished_reason) (aptserve:num_requests_running{cache_type="kv"})'),
           ("foreign", "up == 0")]
    assert len(problems(bad, exported)) == 5
    good = [("histogram",
             "histogram_quantile(0.9, sum by (le) (rate(aptserve:e2e_request_latency_seconds_bucket[5m])))")]
    assert not problems(good, exported)


def test_dashboard_has_every_promised_panel() -> None:
    queried = {name for _, expr in dashboard_queries() for name, _ in used(expr)}
    missing = {panel: series for panel, series in REQUIRED_PANELS.items() if series not in queried}
    assert not missing
    # The latency panels draw their SLO next to the percentiles.
    for title, variable in (("Time to first token vs SLO", "ttft_slo_s"), ("Time between tokens vs SLO", "tbt_slo_s")):
        [panel] = [p for p in dashboard()["panels"] if p["title"] == title]
        exprs = [t["expr"] for t in panel["targets"]]
        assert f"vector(${variable})" in exprs and any("histogram_quantile(0.99" in e for e in exprs), title


def test_alerts_watch_the_waiting_queue_and_attainment() -> None:
    queried = {where.split(": ", 1)[1]: {name for name, _ in used(expr)} for where, expr in rule_queries()}
    assert "aptserve:num_requests_waiting" in queried["AptServeWaitingQueueSustained"]
    falling = queried["AptServeSLOAttainmentFalling"]
    assert {"aptserve:requests_slo_met_total", "aptserve:requests_slo_judged_total"} <= falling


def test_alerts_watch_replicas_that_are_down() -> None:
    document = yaml.safe_load(RULE_FILES[0].read_text())
    rules = {rule["alert"]: rule for group in document["groups"] for rule in group["rules"]}
    assert rules["AptServeReplicaDown"]["expr"].strip() == "aptserve:up == 0"
    assert rules["AptServeReplicaDown"]["labels"]["severity"] == "critical"
    refused = {name for name, _ in used(rules["AptServeRequestsRefusedNoReplica"]["expr"])}
    assert refused == {"aptserve:requests_rejected_total"}


def test_dashboard_is_well_formed_and_generated() -> None:
    from cluster.config import load_config

    board = dashboard()
    spec = importlib.util.spec_from_file_location("build_dashboard", MONITORING / "build_dashboard.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    assert builder.render() == DASHBOARD.read_text(), "regenerate: python deploy/monitoring/build_dashboard.py"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    occupied: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24
        cells = {(x, y) for x in range(box["x"], box["x"] + box["w"]) for y in range(box["y"], box["y"] + box["h"])}
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
        if panel["type"] != "row":
            refs = [t["refId"] for t in panel["targets"]]
            assert refs and len(refs) == len(set(refs)) and panel["datasource"]["uid"] == "${datasource}"
    # The SLO lines start at the default config's SLOs.
    scheduler = load_config().scheduler
    assert float(variables["ttft_slo_s"]["query"]) == scheduler.ttft_slo_s
    assert float(variables["tbt_slo_s"]["query"]) == scheduler.tbt_slo_s
