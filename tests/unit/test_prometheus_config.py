"""deploy/prometheus and deploy/grafana as shipped: promtool accepts the config and the rules and passes the
rules' unit tests; the Grafana provisioning names one data source and loads the dashboards. That every metric
the rules and the dashboard name is really exported is tests/integration/test_pipeline_metrics.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
CONFIGS = (PROMETHEUS / "prometheus.yml", PROMETHEUS / "prometheus-compose.yml")
RULES = PROMETHEUS / "rules.yml"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
DATASOURCE_UID = "rpm-prometheus"

# PromQL words that are not metric names, and what Prometheus itself generates for every target.
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}
SYNTHETIC = {"up"}


def metric_names(expr: str) -> set[str]:
    """The metric (sample) names a PromQL expression selects: identifiers that are not functions, aggregations,
    keywords, label names or label values."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                        # label values
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)                        # matchers, range selectors
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    names = set()
    for m in re.finditer(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        if m.group() not in KEYWORDS and not expr[m.end():].lstrip().startswith("("):
            names.add(m.group())
    return names


def rule_exprs() -> list[str]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule["expr"] for group in doc["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    return [t["expr"] for path in DASHBOARDS for panel in json.loads(path.read_text())["panels"]
            for t in panel.get("targets", [])]


def referenced_metrics() -> set[str]:
    """Every metric the alert rules and the dashboards query (Prometheus' own ``up`` aside)."""
    return {name for expr in rule_exprs() + dashboard_exprs() for name in metric_names(expr)} - SYNTHETIC


def promtool(*args: str) -> subprocess.CompletedProcess:
    # A missing promtool is a broken installation, not a reason to skip: `make system` installs it.
    exe = shutil.which("promtool")
    assert exe, "promtool not found: `make system` installs Debian's prometheus package, which provides it"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_promtool_accepts_the_scrape_config(config: Path):
    proc = promtool("check", "config", str(config))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rules.yml" in proc.stdout  # the rules are part of what it loads and checks


def test_promtool_accepts_the_rules_and_their_unit_tests_pass():
    proc = promtool("check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = promtool("test", "rules", str(PROMETHEUS / "rules_test.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_scrape_configs_point_at_the_exporters_default_ports():
    defaults = Settings.model_fields
    ports = {"rpm-ingest": defaults["ingest_metrics_port"].default, "rpm-pipeline": defaults["metrics_port"].default}
    local, compose = (yaml.safe_load(p.read_text()) for p in CONFIGS)
    assert local["rule_files"] == compose["rule_files"] == ["rules.yml"]
    for doc, hosts in ((local, {"127.0.0.1"}), (compose, {"ingest", "metrics"})):
        jobs = {job["job_name"]: [t for c in job["static_configs"] for t in c["targets"]]
                for job in doc["scrape_configs"]}
        assert {job: [int(t.rsplit(":", 1)[1]) for t in targets] for job, targets in jobs.items()} == \
            {job: [port] for job, port in ports.items()}
        assert {t.rsplit(":", 1)[0] for targets in jobs.values() for t in targets} == hosts


def test_every_alert_has_a_severity_and_says_what_to_do():
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_an_alert_on_a_counter_that_stops_also_fires_when_its_series_is_gone():
    # `increase(x[..]) == 0` is empty, not 0, once x is absent (e.g. `rpm metrics` restarted while Airflow is
    # down): such a rule must also say absent(x). rules_test.yml checks one firing that way.
    for expr in rule_exprs():
        for counter in re.findall(r"increase\((\w+)\[[^\]]*\]\)\s*==\s*0", expr):
            assert f"absent({counter})" in expr, expr


def test_grafana_provisions_one_data_source_that_every_panel_uses():
    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert [(d["uid"], d["type"]) for d in sources["datasources"]] == [(DATASOURCE_UID, "prometheus")]
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "rpm.yml").read_text())["providers"]
    assert [p["type"] for p in providers] == ["file"]
    assert DASHBOARDS, "no dashboard in deploy/grafana/dashboards/"
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        panels = [p for p in dashboard["panels"] if p["type"] != "row"]
        assert panels and len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
        for panel in panels:
            assert panel["targets"], panel["title"]
            assert {panel["datasource"]["uid"], *(t["datasource"]["uid"] for t in panel["targets"])} == \
                {DATASOURCE_UID}, panel["title"]


def test_the_dashboard_covers_what_ops_watch():
    names = {name for expr in dashboard_exprs() for name in metric_names(expr)}
    for wanted in ("rpm_pipeline_last_success_timestamp_seconds", "rpm_pipeline_loaded_total",
                   "rpm_pipeline_quarantined_total", "rpm_pipeline_quarantine_rule_failures_total",
                   "rpm_pipeline_backlog_messages", "rpm_pipeline_freshness_p95_seconds",
                   "rpm_pipeline_task_duration_seconds", "rpm_ingest_connected",
                   "rpm_ingest_messages_received_total", "rpm_ingest_write_errors_total", "rpm_audit_log_ok",
                   "airflow_scheduler_heartbeat_total"):
        assert wanted in names, wanted


def test_metric_names_are_read_out_of_promql():
    assert metric_names('sum by (rule) (increase(rpm_x_total{job="a", rule=~"b.c"}[1h]))') == {"rpm_x_total"}
    assert metric_names("time() - last_ts{dag_id=\"rpm_pipeline\"} > 15 * 60") == {"last_ts"}
    assert metric_names("histogram_quantile(0.95, sum by (le, dag_id) (rate(d_seconds_bucket[1h])))") == \
        {"d_seconds_bucket"}
    assert metric_names("a / on (job) group_left (x) b or c unless d offset 5m") == {"a", "b", "c", "d"}
    assert metric_names("max(up) == 0") == {"up"}
