"""The general (telehealth) stream and ops visibility, as a practice manager and an ops person see them."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import duckdb
import pytest

from core.landing import SEGMENT_SUFFIX, rejected_dir, sealed_dir
from core.settings import Settings
from rpmctl import services
from rpmctl.services import procs
from rpmctl.tools.publish import DevicePublisher, wait_until
from rpmctl.tools.simulator import build_fleet, provision_fleet, publish_fleet
from tests.conftest import rpm, rpm_json
from tests.integration.test_end_to_end import mosquitto_pub
from warehouse.db import clinical
from warehouse.telehealth import open_telehealth, telehealth_db

pytestmark = pytest.mark.integration


def landed(s: Settings) -> int:
    return (services.ingest_status(s) or {}).get("landed", 0)


def test_app_events_and_device_status_reach_the_telehealth_store_without_identifiers(stack: Settings):
    s = stack
    since = (datetime.now(UTC) - timedelta(days=2)).isoformat()
    rpm(s, "patients", "add", "pt-e2e")
    app = rpm_json(s, "devices", "add", "app-e2e", "--patient", "pt-e2e", "--kind", "app", "--since", since)
    cuff = rpm_json(s, "devices", "add", "bp-e2e", "--patient", "pt-e2e", "--kind", "bp", "--since", since)
    assert app["topic"] == "rpm/v1/apps/app-e2e/events"
    t = (datetime.now(UTC) - timedelta(hours=3)).isoformat(timespec="seconds")
    events = {"events": [
        {"msg_id": "e1", "event": "education_completed", "occurred_at": t, "module": "bp-basics", "minutes": 11},
        {"msg_id": "e2", "event": "appointment_attended", "occurred_at": t, "appointment_id": "apt-1",
         "modality": "video"},
        {"msg_id": "e3", "event": "appointment_no_show", "occurred_at": t, "appointment_id": "apt-2"},  # no modality
    ]}
    status = {"msg_id": "s1", "reported_at": t, "battery_pct": 14, "signal_dbm": -80, "firmware": "2.5.0",
              "uptime_s": 3600}
    assert mosquitto_pub(app, json.dumps(events)).returncode == 0
    assert mosquitto_pub(app, json.dumps(events)).returncode == 0  # redelivered: duplicates
    assert mosquitto_pub(cuff, json.dumps(status), topic=cuff["status_topic"]).returncode == 0
    # An app may not publish device status, and a device may not publish app events.
    spoof = mosquitto_pub(app, json.dumps(status), topic="rpm/v1/devices/bp-e2e/status")
    assert b"not authorized" in spoof.stderr.lower()
    wait_until(lambda: landed(s) >= 3, 20, what="ingest to land the messages")
    rpm(s, "pipeline", "run")

    acc = rpm_json(s, "accounting")
    assert acc["loaded_by_stream"] == {"readings": 0, "telehealth_events": 3}
    # Both copies of the invalid event are quarantined (validation comes before dedupe); valid copies dedupe.
    assert (acc["received"], acc["quarantined"], acc["duplicates"]) == (7, 2, 2)
    assert acc["quarantined_by_reason"] == {"appointment_modality_present": 2}
    assert acc["balanced"]

    with pytest.raises(duckdb.Error, match="encrypted"):  # the store opens with its key only
        duckdb.connect(str(telehealth_db(s)), read_only=True)
    con = open_telehealth(s)
    status_rows = con.execute("SELECT battery_pct, firmware, device_kind FROM device_status").fetchall()
    assert status_rows == [(14.0, "2.5.0", "bp")]
    assert con.execute("SELECT module, minutes FROM education_events").fetchall() == [("bp-basics", 11.0)]
    identifiers = ["pt-e2e", "app-e2e", "bp-e2e", "apt-1", "e1", "s1", "rpm-ingest"]
    for (table,) in con.execute("SELECT table_name FROM duckdb_tables()").fetchall():
        cols = [c[0] for c in con.execute(f'DESCRIBE "{table}"').fetchall()]
        for col in cols:
            values = {str(v[0]) for v in con.execute(f'SELECT DISTINCT CAST("{col}" AS VARCHAR) FROM "{table}"')
                      .fetchall() if v[0] is not None}
            leaked = {i for i in identifiers for v in values if i == v or (len(i) > 3 and i in v)}
            assert not leaked, f"{table}.{col} contains {leaked}"
    con.close()
    raw = telehealth_db(s).read_bytes()
    assert not [i for i in ("pt-e2e", "app-e2e", "bp-e2e", "apt-1") if i.encode() in raw]


def test_ops_status_is_healthy_then_degraded_when_ingest_stops_while_devices_publish(stack: Settings):
    # The simulated fleet sends a few implausible readings on purpose (~5 %, around RPM_QUARANTINE_WARN): the
    # quarantine thresholds are not this test's subject (tests/unit/test_ops_verdict.py, the Airflow stack's).
    s = stack.replace(quarantine_warn=0.25)
    fleet = build_fleet(patients=2, days=1, seed=3)
    provision_fleet(s, fleet, days=1)
    sent = publish_fleet(s, fleet)
    wait_until(lambda: landed(s) >= sent["published"], 30, what="ingest to land the fleet")
    rpm(s, "pipeline", "run")
    healthy = rpm(s, "ops", "status", "--json", check=False)
    status = json.loads(healthy.stdout)
    assert (healthy.returncode, status["verdict"]) == (0, "healthy"), status["reasons"]
    run = status["runs"][0]
    assert run["state"] == "success" and run["loaded"] > 0
    assert set(run["task_seconds"]) >= {"claim", "decode_normalise", "validate", "load"}  # an object, not text
    assert run["measured_to_loaded_p95_s"] is not None

    report = s.home / "reports" / "validation"
    page = next(p for p in report.glob("*.html") if p.name != "index.html").read_text()
    assert "plausible_heart_rate" in page or "no item failed validation" in page
    for d in fleet.devices:  # no identifiers (and so no PHI context) in the ops page
        assert d.device_id not in page and d.patient_id not in page

    procs.stop(s, services.INGEST)
    device = next(d for d in fleet.devices if d.kind == "bp")
    with DevicePublisher(s, device.device_id, device.password) as pub:  # the broker still takes readings
        pub.publish(json.dumps({"msg_id": "while-down", "metric": "heart_rate", "unit": "/min", "value": 70,
                                "measured_at": datetime.now(UTC).isoformat()}).encode())
        pub.wait_all()
    degraded = rpm(s, "ops", "status", "--json", check=False)
    status = json.loads(degraded.stdout)
    assert (degraded.returncode, status["verdict"]) == (1, "degraded")
    assert any("ingest service is not running" in r for r in status["reasons"])


def test_a_failed_task_leaves_a_failed_run_and_ops_says_failing(stack: Settings):
    """An environment fault in landing (the rejected area cannot be created, so an unreadable segment cannot
    be set aside: an OSError, not the segment's fault): the decode task fails, the failure callback records
    the run, and `rpm ops status` says failing with the task's name."""
    s = stack
    fleet = build_fleet(patients=1, days=1, seed=2)
    provision_fleet(s, fleet, days=1)
    sent = publish_fleet(s, fleet)
    wait_until(lambda: landed(s) >= sent["published"], 30, what="ingest to land the fleet")
    procs.stop(s, services.INGEST)  # seals what it has
    stray = sealed_dir(s.landing_dir) / f"aa-garbage-000001{SEGMENT_SUFFIX}"  # type: ignore[arg-type]
    stray.write_bytes(b"garbage")
    blocked = rejected_dir(s.landing_dir)  # type: ignore[arg-type]
    blocked.write_bytes(b"")  # a file where the rejected folder goes
    try:
        failed = rpm(s, "pipeline", "run", check=False, timeout=400)
        assert failed.returncode == 1 and "failed" in failed.stderr
        status = json.loads(rpm(s, "ops", "status", "--json", check=False).stdout)
        assert status["verdict"] == "failing"
        assert status["runs"][0]["state"] == "failed" and status["runs"][0]["failed_task"] == "decode_normalise"
    finally:
        blocked.unlink()
        stray.unlink()
    with clinical(s) as con:  # nothing half-loaded: the ledger is empty, every segment still pending
        assert con.execute("SELECT count(*) FROM segments").fetchone() == (0,)
