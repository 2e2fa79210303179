"""`rpm metrics` as `rpm up` starts it, scraped over HTTP as Prometheus would, beside the real ingest service:
its figures follow a simulated fleet through a pipeline run, Airflow's own StatsD client reaches it, every
metric the shipped alert rules and Grafana dashboard query is really exported, and a tampered audit log
turns it red."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from core.settings import Settings
from rpmctl import services
from rpmctl.services import procs
from rpmctl.services.airflow_stack import stack_env
from rpmctl.tools.publish import wait_until
from rpmctl.tools.simulator import build_fleet, provision_fleet, publish_fleet
from tests.conftest import rpm, user_env
from tests.integration.test_ingest import landed
from tests.promtext import Family, parse
from tests.steps import run_pipeline_in_process
from tests.unit.test_prometheus_config import referenced_metrics
from warehouse.accounting import accounting
from warehouse.audit import AuditLog

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
P = "rpm_pipeline_"

# A DAG task's hold on the warehouse: the writer's connection open until stdin closes.
HOLD_WRITER = """
import sys
from core.settings import Settings
from warehouse.db import clinical
with clinical(Settings.from_env()):
    print("held", flush=True)
    sys.stdin.read()
"""

# What Airflow's components emit, through Airflow's own stats module configured by the local stack's
# environment (statsd_on, host, port, prefix, tags): the same client and settings the scheduler uses.
AIRFLOW_EMITS = """
from datetime import timedelta
from airflow.configuration import conf
from airflow.observability.metrics import stats_utils
from airflow._shared.observability.metrics import stats
stats.initialize(factory=stats_utils.get_stats_factory(),
                 export_legacy_names=conf.getboolean("metrics", "legacy_names_on"))
stats.incr("scheduler_heartbeat", 1, 1)
stats.incr("dag_processor_heartbeat", 1, 1)
stats.incr("ti.finish", tags={"dag_id": "rpm_pipeline", "task_id": "load", "state": "success"})
stats.timing("dagrun.duration.success", dt=timedelta(seconds=21), tags={"dag_id": "rpm_pipeline"})
"""


def body(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        assert r.status == 200
        return r.read().decode()


def exporter(s: Settings) -> str:
    return body(services.metrics_url(s))


def ingest_metrics(s: Settings) -> str:
    return body(f"http://127.0.0.1:{s.ingest_metrics_port}/metrics")


def sample_names(text: str) -> set[str]:
    """Every sample name an exposition carries: a counter's ``_total``, a histogram's ``_bucket`` and so on,
    exactly as prometheus_client wrote them."""
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def value(families: dict[str, Family], name: str, **labels: str) -> float:
    return families[name].value(**labels)



@pytest.fixture
def rpm_up(settings: Settings) -> Settings:
    """Everything `rpm up` starts (the metrics exporter among it)."""
    services.up(settings)
    return settings

def test_the_exporter_follows_a_fleet_through_a_run_and_exports_what_rules_and_dashboard_query(rpm_up: Settings):
    s = rpm_up
    pid = services.status(s)["metrics_pid"]
    assert pid and procs.read_pid(s, services.METRICS) == pid  # `rpm up` started it, with a pid file

    # A fresh ingest, before any traffic, already exports every rpm_ingest_* metric the rules and the dashboard
    # query: a series that appears only with its first event leaves rate() and alerts blind until then.
    fresh = sample_names(ingest_metrics(s))
    assert {m for m in referenced_metrics() if m.startswith("rpm_ingest_")} - fresh == set()

    fleet = build_fleet(patients=2, days=1, seed=5)
    provision_fleet(s, fleet, days=1)
    sent = publish_fleet(s, fleet)
    wait_until(lambda: landed(s) >= sent["published"], 30, what="ingest to land the fleet")

    # While a DAG task holds the warehouse, a scrape neither fails nor waits: it never opens the writer's file.
    holder = subprocess.Popen([sys.executable, "-c", HOLD_WRITER], env=user_env(s), cwd=ROOT, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        before = parse(exporter(s))
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    assert value(before, P + "snapshot_readable") == 1
    waiting = sum(value(before, P + "backlog_messages", segment_state=st) for st in ("sealed", "open"))
    assert waiting == sent["published"]
    assert value(before, P + "backlog_oldest_age_seconds") > 0
    assert P + "runs_total" not in before or value(before, P + "runs_total", dag_id="rpm_pipeline",
                                                   state="success") == 0

    run = run_pipeline_in_process(s)
    subprocess.run([sys.executable, "-c", AIRFLOW_EMITS], env={**os.environ, **stack_env(s)}, check=True,
                   capture_output=True, timeout=120)
    wait_until(lambda: "airflow_dagrun_duration_success_seconds_bucket" in sample_names(exporter(s)), 20,
               what="Airflow's StatsD metrics to reach the exporter")

    text = exporter(s)
    after, acc, manifest = parse(text), accounting(s), fleet.manifest()
    assert value(after, P + "runs_total", dag_id="rpm_pipeline", state="success") == 1
    assert value(after, P + "last_run_ok", dag_id="rpm_pipeline") == 1
    assert [value(after, f"{P}{k}_total") for k in ("loaded", "quarantined", "duplicates", "received")] == \
        [acc["loaded"], acc["quarantined"], acc["duplicates"], acc["received"]] == \
        [*(manifest["expected"][k] for k in ("loaded", "quarantined", "duplicates")), manifest["readings"]]
    assert {dict(k)["rule"]: v for k, v in after[P + "quarantine_rule_failures_total"].samples.items()} == \
        run["tasks"]["validate"]["failures_by_rule"]
    assert value(after, P + "backlog_messages", segment_state="sealed") == 0
    assert 0 < value(after, P + "freshness_p95_seconds", span="received_to_loaded") < 600
    assert set(after[P + "task_duration_seconds"].samples) >= \
        {(("task", t),) for t in ("claim", "decode_normalise", "validate", "load")}
    assert value(after, "rpm_audit_log_ok") == 1
    assert value(after, "airflow_scheduler_heartbeat_total") == 1
    assert value(after, "airflow_ti_finish_total", dag_id="rpm_pipeline", task_id="load", state="success") == 1

    # Every metric the alert rules and the dashboard query exists on a running endpoint, suffix and all.
    exported = sample_names(text) | sample_names(ingest_metrics(s))
    assert referenced_metrics() - exported == set()

    # No PHI: no patient or device id, no value.
    assert not any(p in text for p in fleet.patients) and not any(d.device_id in text for d in fleet.devices)

    stopped = services.down(s)
    assert stopped["metrics_stopped"] is True and not procs.port_open("127.0.0.1", s.metrics_port)


def test_a_tampered_audit_log_shows_on_the_next_scrape(rpm_up: Settings):
    s = rpm_up
    audit = AuditLog(s)
    for n in range(3):
        audit.append("dr-test", "patients:list", [f"pt-{n}"], {}, 1)
    assert value(parse(exporter(s)), "rpm_audit_log_ok") == 1
    lines = audit.path.read_bytes().splitlines(keepends=True)
    middle = bytearray(lines[1])
    middle[10] ^= 0x01  # one bit of the middle record
    audit.path.write_bytes(lines[0] + bytes(middle) + lines[2])
    assert value(parse(exporter(s)), "rpm_audit_log_ok") == 0


def test_rpm_metrics_refuses_a_disabled_or_taken_port_in_one_line(settings: Settings):
    services.init(settings)
    disabled = rpm(settings.replace(metrics_port=0), "metrics", check=False)
    assert (disabled.returncode, disabled.stderr) == (2, "error: the metrics exporter is disabled "
                                                         "(RPM_METRICS_PORT=0)\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", settings.metrics_port))
        taken.listen()
        busy = rpm(settings, "metrics", check=False)
    assert busy.returncode == 2 and busy.stderr.startswith("error: cannot listen on 127.0.0.1") \
        and busy.stderr.count("\n") == 1, busy.stderr
