"""The ops verdict covers what an ops person must act on: a batch that was mostly quarantined, rpm_daily failing,
Airflow's scheduler or DAG processor without a heartbeat — each named, with since when — and no stale
"connected" for a dead ingest service. Run records are written by the same functions the DAGs call."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from core.settings import Settings
from pipeline import tasks
from rpmctl.services import airflow_stack
from rpmctl.views.ops import ops_status, render_ops
from warehouse.db import clinical
from warehouse.ops import RunCounts, record_failure, record_run
from warehouse.serving import publish_snapshot


def record(s: Settings, run_id: str, received: int, quarantined: int, *, finished_ago: timedelta | None = None) -> None:
    """A run whose batch had ``received`` items, ``quarantined`` of them quarantined, recorded as record_run writes
    it (``received`` is the ledger's sum: set here, there is no ledger in these tests) and published."""
    with clinical(s) as con:
        record_run(con, run_id, datetime.now(UTC), RunCounts(loaded=received - quarantined, quarantined=quarantined),
                   {"load": 0.1})
        con.execute("UPDATE pipeline_runs SET received = ? WHERE run_id = ?", [received, run_id])
        if finished_ago is not None:
            con.execute("UPDATE pipeline_runs SET finished_at = ? WHERE run_id = ?",
                        [datetime.now(UTC) - finished_ago, run_id])
        publish_snapshot(s, con)


@pytest.fixture
def s(settings: Settings) -> Settings:
    return settings


def test_a_clean_run_is_healthy_on_quarantine(s: Settings) -> None:
    record(s, "run-clean", 1000, 10)  # 1 %
    st = ops_status(s)
    assert not any("quarantined" in r for r in st["reasons"]), st["reasons"]


def test_a_run_above_the_warning_rate_is_degraded_and_named(s: Settings) -> None:
    record(s, "run-warn", 1000, 80)  # 8 % > 5 %
    st = ops_status(s)
    [reason] = [r for r in st["reasons"] if r.startswith("run run-warn (finished ")]
    assert "run-warn" in reason and "80 of 1000" in reason and "8.0%" in reason and "RPM_QUARANTINE_WARN" in reason
    assert st["verdict"] == "degraded"  # (the broker is not running here either: also degraded, never failing)


def test_an_all_bad_batch_is_failing(s: Settings) -> None:
    record(s, "run-all-bad", 40, 40)
    st = ops_status(s)
    assert st["verdict"] == "failing"
    assert any("run-all-bad" in r and "100.0%" in r and "RPM_QUARANTINE_FAIL" in r for r in st["reasons"])


def test_a_red_batch_stays_news_for_an_hour_whatever_runs_after_it(s: Settings) -> None:
    """Two all-bad batches, then an empty run and a big clean one: the verdict does not forget them at the next
    schedule; it names the worst run and how many more there were."""
    record(s, "run-red-1", 100, 100, finished_ago=timedelta(minutes=30))
    record(s, "run-red-2", 50, 50, finished_ago=timedelta(minutes=20))
    record(s, "run-empty", 0, 0, finished_ago=timedelta(minutes=10))
    record(s, "run-clean", 7000, 0)
    st = ops_status(s)
    assert st["verdict"] == "failing"
    [red] = [r for r in st["reasons"] if r.startswith("run run-red")]
    assert "100.0%" in red and "(and 1 more run(s) in the last hour" in red
    assert not any(r.startswith("run run-red") for r in ops_status(s, now=datetime.now(UTC) + timedelta(hours=1))["reasons"])


def test_thresholds_are_settings(s: Settings) -> None:
    record(s, "run-8pc", 1000, 80)
    assert not any("quarantined" in r for r in ops_status(s.replace(quarantine_warn=0.1))["reasons"])
    assert ops_status(s.replace(quarantine_warn=0.01, quarantine_fail=0.05))["verdict"] == "failing"


def test_a_quality_gate_failure_keeps_the_runs_counts(s: Settings) -> None:
    """The gate fails after record_run: the failure callback marks the run failed without erasing what it
    loaded, and the verdict names the rate rather than a bare "failed in quality_gate"."""
    record(s, "run-gated", 50, 50)
    with clinical(s) as con:
        record_failure(con, "run-gated", "quality_gate", "AirflowFailException: run run-gated quarantined ...")
        row = con.execute("SELECT state, failed_task, received, quarantined FROM pipeline_runs "
                          "WHERE run_id = 'run-gated'").fetchone()
        publish_snapshot(s, con)
    assert row == ("failed", "quality_gate", 50, 50)
    st = ops_status(s)
    assert st["verdict"] == "failing"
    assert not any(r.startswith("last run run-gated failed in quality_gate") for r in st["reasons"])
    assert any(r.startswith("run run-gated") and "50 of 50" in r for r in st["reasons"])


def test_quality_gate_task_levels(s: Settings) -> None:
    assert tasks.quality_gate({"run_id": "r", "received": 100, "quarantined": 5}, s)["level"] == "ok"  # = 5 %
    assert tasks.quality_gate({"run_id": "r", "received": 100, "quarantined": 6}, s)["level"] == "warn"
    assert tasks.quality_gate({"run_id": "r", "received": 100, "quarantined": 51}, s)["level"] == "fail"
    assert tasks.quality_gate({"run_id": "r", "received": 0, "quarantined": 0}, s)["level"] == "ok"


def test_a_failed_daily_run_is_failing_until_one_succeeds(s: Settings) -> None:
    """rpm_daily's run ids collide with rpm_pipeline's (both scheduled at midnight): its records are its own."""
    midnight = "scheduled__2026-12-07T00:00:00+00:00"
    record(s, midnight, 10, 0)
    with clinical(s) as con:
        record_failure(con, midnight, "purge_landing", "OSError: disk full", dag_id="rpm_daily")
        publish_snapshot(s, con)
    st = ops_status(s)
    assert st["verdict"] == "failing"
    assert any(r.startswith(f"rpm_daily run {midnight} failed in purge_landing") for r in st["reasons"])
    assert st["runs"][0]["run_id"] == midnight and st["runs"][0]["state"] == "success"  # the pipeline's own
    tasks.record_daily(midnight, None, {"purge_landing": {"seconds": 0.1}}, s)
    assert not any("rpm_daily" in r for r in ops_status(s)["reasons"])


def test_a_dead_ingest_is_never_shown_connected(s: Settings) -> None:
    Path(s.run_dir).mkdir(parents=True, exist_ok=True)
    (Path(s.run_dir) / f"ingest-{s.ingest_client_id}.json").write_text(json.dumps(
        {"connected": True, "subscribed": True, "pid": 999999, "landed": 5}))
    st = ops_status(s)
    assert st["ingest"]["running"] is False and st["ingest"]["connected"] is False
    assert "connected" not in render_ops(st).split("ingest: ")[1].split(";")[0]


def _job_table(s: Settings, beats: dict[str, datetime]) -> None:
    home = Path(s.airflow_home)
    home.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(home / "airflow.db") as con:
        con.execute("CREATE TABLE job (id INTEGER PRIMARY KEY, job_type TEXT, state TEXT, latest_heartbeat TEXT)")
        con.executemany("INSERT INTO job (job_type, state, latest_heartbeat) VALUES (?, 'running', ?)",
                        [(job, when.strftime("%Y-%m-%d %H:%M:%S.%f")) for job, when in beats.items()])


def test_airflow_not_wanted_is_not_judged(s: Settings) -> None:
    st = ops_status(s)
    assert st["airflow"]["expected"] is False
    assert not any("Airflow" in r for r in st["reasons"])


def test_a_wanted_airflow_with_a_dead_scheduler_is_degraded_naming_it_and_since_when(s: Settings) -> None:
    """The API server is down too here (nothing listens): the heartbeats come from the metadata database."""
    s = s.replace(airflow_port=1)  # nothing answers on port 1
    now = datetime.now(UTC).replace(tzinfo=None)
    stale = now - timedelta(minutes=7)
    _job_table(s, {"SchedulerJob": stale, "DagProcessorJob": now, "TriggererJob": now})
    Path(s.run_dir).mkdir(parents=True, exist_ok=True)
    airflow_stack.wanted_file(s).touch()
    st = ops_status(s)
    [dead] = [r for r in st["reasons"] if "scheduler is not alive" in r]
    assert f"{stale:%Y-%m-%d %H:%M}" in dead and "7 min ago" in dead
    assert not any("dag processor is not alive" in r for r in st["reasons"])
    assert any("API server is not answering" in r for r in st["reasons"])
    assert "scheduler heartbeat" in render_ops(st)


def test_a_supervisor_restart_is_reported_with_its_reason(s: Settings) -> None:
    from rpmctl.services import restarts

    Path(s.run_dir).mkdir(parents=True, exist_ok=True)
    restarts.record(s, "airflow-scheduler", "airflow", 4242, 4343, -9, 0, 1.0)
    st = ops_status(s)
    [line] = [r for r in st["reasons"] if r.startswith("airflow-scheduler restarted")]
    assert "SIGKILL" in line and "1 restart(s) in 24 h" in line
    assert st["restarts"]["airflow-scheduler"]["restarts_24h"] == 1
    assert "restarts (24 h): airflow-scheduler 1" in render_ops(st)
    # An hour later it is history, not news.
    later = ops_status(s, now=datetime.now(UTC) + timedelta(hours=1))
    assert not any(r.startswith("airflow-scheduler restarted") for r in later["reasons"])


def test_a_remote_airflow_is_judged_by_its_health_endpoint(s: Settings) -> None:
    """Under compose, Airflow is another container: RPM_AIRFLOW_URL names its API server, and a dead scheduler
    there makes the verdict degraded like the local stack's would."""
    import http.server
    import threading

    now = datetime.now(UTC)
    body = json.dumps({"metadatabase": {"status": "healthy"},
                       "scheduler": {"status": "unhealthy",
                                     "latest_scheduler_heartbeat": (now - timedelta(minutes=3)).isoformat()},
                       "dag_processor": {"status": "healthy", "latest_dag_processor_heartbeat": now.isoformat()},
                       "triggerer": {"status": "healthy", "latest_triggerer_heartbeat": now.isoformat()}}).encode()

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            code = 200 if self.path == airflow_stack.HEALTH else 404
            self.send_response(code)
            self.end_headers()
            self.wfile.write(body if code == 200 else b"")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        st = ops_status(s.replace(airflow_url=f"http://127.0.0.1:{server.server_port}"))
    finally:
        server.shutdown()
    assert st["airflow"]["expected"] and st["airflow"]["source"] == "api"
    assert [r for r in st["reasons"] if "Airflow" in r] == [
        r for r in st["reasons"] if r.startswith("Airflow scheduler is not alive: last heartbeat") and "3 min ago" in r]


def serve(handler_body) -> tuple[object, str]:
    """A local HTTP server whose GET runs ``handler_body(handler)``; returns (server, base URL)."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            handler_body(self)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}"


def test_a_hostile_airflow_health_answer_is_no_heartbeat_not_a_crash(s: Settings) -> None:
    for answer in ({"scheduler": "healthy"}, {"scheduler": {"latest_scheduler_heartbeat": 12345}},
                   {"scheduler": {"latest_scheduler_heartbeat": "yesterday"}}, ["not", "a", "dict"]):
        body = json.dumps(answer).encode()

        def reply(h, body: bytes = body) -> None:
            h.send_response(200)
            h.end_headers()
            h.wfile.write(body)
        server, url = serve(reply)
        try:
            st = ops_status(s.replace(airflow_url=url))
        finally:
            server.shutdown()
        assert any("scheduler is not alive: no heartbeat recorded" in r or "API server is not answering" in r
                   for r in st["reasons"]), (answer, st["reasons"])


def test_a_trickling_airflow_cannot_hold_the_verdict(s: Settings) -> None:
    import threading

    stop = threading.Event()

    def trickle(h) -> None:
        h.send_response(200)
        h.end_headers()
        while not stop.wait(0.5):  # one byte every half second, forever
            try:
                h.wfile.write(b" ")
                h.wfile.flush()
            except OSError:
                return
    server, url = serve(trickle)
    try:
        started = datetime.now(UTC)
        st = ops_status(s.replace(airflow_url=url))
        took = (datetime.now(UTC) - started).total_seconds()
    finally:
        stop.set()
        server.shutdown()
    assert any("API server is not answering" in r for r in st["reasons"])
    assert took < 15  # the health read is bounded as a whole (3 s), not per byte


def test_stored_text_cannot_forge_a_line_of_the_verdict(s: Settings) -> None:
    from rpmctl.services import restarts

    Path(s.run_dir).mkdir(parents=True, exist_ok=True)
    restarts.record(s, "ingest\x1b[2J\r\npipeline: HEALTHY", "watchdog", 1, 2, -9, 0, 1.0)
    text = render_ops(ops_status(s))
    assert "\x1b" not in text and "\r" not in text
    assert not any(line.startswith("pipeline: HEALTHY") for line in text.splitlines()[1:])


def test_json_holds_task_seconds_as_an_object(s: Settings) -> None:
    record(s, "run-1", 10, 0)
    assert ops_status(s)["runs"][0]["task_seconds"] == {"load": 0.1}


def test_a_dead_watchdog_is_reported(s: Settings) -> None:
    """`rpm up` left a watchdog; it died (kill -9): nothing restarts a crashed component any more — said so."""
    import subprocess

    from rpmctl import services
    from rpmctl.services import procs as procs_

    services.init(s)
    gone = subprocess.Popen(["true"])
    gone.wait()
    procs_.pid_file(s, "watchdog").write_text(f"{gone.pid}\n")
    procs_.pid_file(s, services.INGEST).write_text(f"{gone.pid}\n")  # `rpm up` state exists
    st = ops_status(s)
    assert any("watchdog" in r for r in st["reasons"]), st["reasons"]
