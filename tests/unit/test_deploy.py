"""deploy/: the Prometheus config, the alert rules and their unit tests, the Grafana dashboard.

promtool (Debian package `prometheus`) checks the config and rules and runs alerts_test.yml.
Every metric and label the rules and the dashboard query must be one Edge exports, so a
renamed metric breaks this test instead of silently emptying a panel or muting an alert.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from edge.metrics import LoopCounter, Metrics
from edge.settings import Settings
from tests.counted import count_response

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
CONFIG = PROMETHEUS / "prometheus.yml"
RULES = PROMETHEUS / "alerts.yml"
RULE_TESTS = PROMETHEUS / "alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "edge-dashboard.json"

# Made by Prometheus itself, not by Edge.
PROMETHEUS_SERIES = {"up", "ALERTS", "ALERTS_FOR_STATE"}
# Added by Prometheus to every scraped series, and the histogram bucket label.
TARGET_LABELS = {"job", "instance"}
# Labels that exist only in query results: ALERTS' own, and the rules' label_replace output.
DERIVED_LABELS = {"alertname", "alertstate", "reason"}

GUIDE_ALERTS = {
    "EdgeDown",
    "EdgeSlowResponses",
    "EdgeHighMemory",
    "EdgeLowCacheHitRate",
    "EdgeDatabasePoolExhausted",
    "EdgeStreamingErrors",
    "EdgeRedisDown",
}

# PromQL words that are not metric names: operators and modifiers (functions and
# aggregations are recognised by the parenthesis that follows them).
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
_KEYWORDS |= {"group_left", "group_right", "inf", "nan", "atan2"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
# A whole word (not part of a number like 0.5e3) not followed by "(": no function name.
_NAME = re.compile(r"(?<![a-zA-Z0-9_:.])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![a-zA-Z0-9_:]|\s*\()")


# -- helpers ---------------------------------------------------------------------------------


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail(
            "promtool is not installed: install Debian's `prometheus` package "
            "(apt-get install -y prometheus), which provides it"
        )
    return subprocess.run(
        [exe, *args], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )


def without_grafana_variables(expr: str) -> str:
    """The PromQL Grafana sends: its interval and template variables filled in."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "1m")
    return re.sub(r"\$\{?[a-zA-Z_][a-zA-Z0-9_]*\}?", ".+", expr)


def metric_names(expr: str) -> set[str]:
    expr = _STRING.sub('""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = _GROUPING.sub(" ", expr)
    return {n for n in _NAME.findall(expr) if n not in _KEYWORDS}


def selector_labels(expr: str) -> Iterator[tuple[str, set[str]]]:
    """(metric name, label names it is matched on) for each selector with a name."""
    for name, body in _SELECTOR.findall(_STRING.sub('""', expr)):
        if name:
            yield name, set(_MATCHER.findall(body))


def grouping_labels(expr: str) -> set[str]:
    found: set[str] = set()
    for body in _GROUPING.findall(_STRING.sub('""', expr)):
        found |= {label.strip() for label in body.split(",") if label.strip()}
    return found


class _PoolSizes:
    """What Metrics.watch_pool reads from an asyncpg pool: its size counters."""

    def get_size(self) -> int:
        return 5

    def get_idle_size(self) -> int:
        return 3

    def get_max_size(self) -> int:
        return 20


def exported() -> dict[str, set[str]]:
    """Edge's series names (edge_http_requests_total, ..._bucket, ...) and family names, each
    with its label names; every labelled metric is touched once so that it has series."""
    metrics = Metrics()
    metrics.watch_pool(_PoolSizes)
    for collector in vars(metrics).values():
        # A labelled metric exports nothing until a child exists; make one per family.
        if isinstance(collector, MetricWrapperBase) and collector._labelnames:
            collector.labels(*("probe" for _ in collector._labelnames))
        elif isinstance(collector, LoopCounter):
            collector.labels(*("probe" for _ in collector.labelnames))
    count_response(metrics.http, "probe", "GET", 200, 0.001)
    names: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        labels = names.setdefault(family.name, set())
        for sample in family.samples:
            labels.update(sample.labels)
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def panels(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in doc["panels"]:
        yield from panel.get("panels", [])
        if panel["type"] != "row":
            yield panel


def queries() -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every alert rule and every dashboard target."""
    for rule in rules():
        yield f"alerts.yml {rule['alert']}", rule["expr"]
    for panel in panels(dashboard()):
        for target in panel["targets"]:
            yield f"dashboard {panel['title']!r}", without_grafana_variables(target["expr"])


# -- Prometheus ------------------------------------------------------------------------------


def test_prometheus_config_is_valid() -> None:
    result = promtool("check", "config", str(CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_edge_and_loads_the_rules() -> None:
    doc = yaml.safe_load(CONFIG.read_text())
    assert doc["rule_files"] == ["alerts.yml"]
    (job,) = [j for j in doc["scrape_configs"] if j["job_name"] == "edge"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert [t for c in job["static_configs"] for t in c["targets"]] == ["127.0.0.1:8080"]
    interval = job.get("scrape_interval", doc["global"]["scrape_interval"])
    assert re.fullmatch(r"\d+s", interval) and 5 <= int(interval[:-1]) <= 15, interval


def test_alert_rules_are_valid() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_pass_their_unit_tests() -> None:
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_guide_alert_is_there_with_severity_and_annotations() -> None:
    found = {rule["alert"]: rule for rule in rules()}
    assert set(found) == GUIDE_ALERTS
    for name, rule in found.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert {"summary", "description"} <= set(rule["annotations"]), name
        assert "$value" in rule["annotations"]["description"] or name in (
            "EdgeDown",
            "EdgeRedisDown",
        ), f"{name}: the description should say the value"


def test_every_guide_alert_is_tested() -> None:
    doc = yaml.safe_load(RULE_TESTS.read_text())
    tested = {case["alertname"] for test in doc["tests"] for case in test["alert_rule_test"]}
    assert tested == GUIDE_ALERTS


def test_alert_thresholds_are_the_settings_defaults() -> None:
    """alerts.yml writes the defaults in; a changed default must change the rules too."""
    s = Settings()
    expr = {rule["alert"]: " ".join(rule["expr"].split()) for rule in rules()}
    assert f") > {s.alert_response_time_ms / 1000:g}" in expr["EdgeSlowResponses"]
    assert s.alert_memory_usage_mb == 512
    assert "> 512 * 1024 * 1024" in expr["EdgeHighMemory"]
    assert f") < {s.alert_cache_hit_rate:g}" in expr["EdgeLowCacheHitRate"]
    assert f") >= {s.alert_min_requests}" in expr["EdgeLowCacheHitRate"]
    assert f") > {s.alert_stream_error_rate:g}" in expr["EdgeStreamingErrors"]
    assert f") >= {s.alert_min_requests}" in expr["EdgeStreamingErrors"]


# -- Grafana ---------------------------------------------------------------------------------


def test_dashboard_loads_and_every_panel_queries_prometheus() -> None:
    doc = dashboard()
    assert 36 <= doc["schemaVersion"] <= 41
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    found = list(panels(doc))
    assert len(found) >= 30
    assert len({p["id"] for p in doc["panels"]}) == len(doc["panels"])
    for panel in found:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no target"
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]


def test_dashboard_covers_what_operators_watch() -> None:
    text = " ".join(t["expr"] for p in panels(dashboard()) for t in p["targets"])
    for metric in (
        "edge_http_requests_total",
        "edge_http_request_duration_seconds_bucket",
        "edge_http_requests_in_flight",
        "edge_errors_total",
        "edge_db_pool_waiters",
        "edge_db_pool_acquire_seconds_bucket",
        "edge_db_query_duration_seconds_bucket",
        "edge_db_slow_queries_total",
        "edge_cache_requests_total",
        "edge_redis_up",
        "edge_stream_sessions_active",
        "edge_stream_bytes_total",
        "edge_stream_time_to_first_byte_seconds_bucket",
        "edge_upstream_errors_total",
        "edge_signed_urls_total",
        "edge_player_events_total",
        "edge_player_errors_total",
        "edge_stream_quality_total",
        "edge_plays_counted_total",
        "edge_plays_flushed_total",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        "edge_event_loop_lag_seconds_bucket",
        "edge_alert_firing",
    ):
        assert metric in text, f"no panel shows {metric}"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each panel query, as recording rules in a scratch rule file."""
    rules_file = tmp_path / "dashboard_rules.yml"
    records = [
        {"record": f"dashboard:query_{i}", "expr": expr}
        for i, (where, expr) in enumerate(queries())
        if where.startswith("dashboard")
    ]
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": records}]}))
    result = promtool("check", "rules", str(rules_file))
    assert result.returncode == 0, result.stdout + result.stderr


def test_legends_name_labels_the_query_keeps() -> None:
    for panel in panels(dashboard()):
        for target in panel["targets"]:
            legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            kept = grouping_labels(target["expr"]) | TARGET_LABELS
            assert legend <= kept, f"{panel['title']!r}: legend uses {legend - kept}"


# -- both against Edge's metrics -------------------------------------------------------------


def test_every_metric_queried_is_one_edge_exports() -> None:
    """By series name, suffix included: a counter queried as _bucket is caught too."""
    series = exported()
    process_exported = any(name.startswith("process_") for name in series)
    missing = []
    for where, expr in queries():
        for name in metric_names(expr):
            if name in PROMETHEUS_SERIES or name in series:
                continue
            if name.startswith("process_") and not process_exported:
                continue  # ProcessCollector exports nothing where there is no /proc
            missing.append(f"{where}: {name}")
    assert not missing, "not exported by edge.metrics.Metrics: " + ", ".join(missing)


def test_every_label_queried_is_one_the_metric_has() -> None:
    series = exported()
    wrong = []
    for where, expr in queries():
        for name, labels in selector_labels(expr):
            if name not in series:
                continue  # Prometheus' own, or reported by the metric-name test
            allowed = series[name] | TARGET_LABELS
            wrong += [f"{where}: {name}{{{label}}}" for label in labels - allowed]
        # Grouping by a label none of the expression's metrics has gives one unlabelled line.
        used = [series.get(name, set()) for name in metric_names(expr)]
        known = set().union(*used) | TARGET_LABELS | DERIVED_LABELS
        wrong += [f"{where}: by/on ({label})" for label in grouping_labels(expr) - known]
    assert not wrong, "labels Edge does not export: " + ", ".join(wrong)


def test_the_name_and_label_parsers_see_what_they_must() -> None:
    """The checks above are only as good as these regexes."""
    expr = (
        'sum by (job, le) (rate(edge_x_bucket{route!~"a|b", le="+Inf"}[5m]))'
        ' / on (instance) group_left up{job="edge"} and ALERTS or vector(1) > bool 0.5e3'
    )
    assert metric_names(expr) == {"edge_x_bucket", "up", "ALERTS"}
    assert dict(selector_labels(expr)) == {"edge_x_bucket": {"route", "le"}, "up": {"job"}}
    assert grouping_labels(expr) == {"job", "le", "instance"}
    assert metric_names(without_grafana_variables('rate(a{i=~"$instance"}[$__rate_interval])')) == {
        "a"
    }
