"""End to end as a user runs it: `rpm devices add --json`, the stock mosquitto_pub, `rpm pipeline run`
(a real Airflow dag.test() run), then the warehouse, the quarantine and `rpm accounting --json`."""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import UTC, datetime, timedelta, timezone

import duckdb
import pytest

from core.settings import Settings
from rpmctl.services import ingest_status
from rpmctl.tools.publish import wait_until
from rpmctl.tools.simulator import build_fleet, provision_fleet, publish_fleet
from tests.conftest import rpm, rpm_json
from warehouse.db import clinical

pytestmark = pytest.mark.integration

MOSQUITTO_PUB = shutil.which("mosquitto_pub") or "/usr/bin/mosquitto_pub"


def mosquitto_pub(creds: dict, payload: str | bytes, topic: str | None = None) -> subprocess.CompletedProcess:
    """Publish like a device integrator would: the stock C client, MQTT 5, QoS 1, over TLS."""
    return subprocess.run(
        [MOSQUITTO_PUB, "-V", "mqttv5", "-q", "1", "-h", creds["host"], "-p", str(creds["port"]),
         "--cafile", creds["ca_file"], "-u", creds["username"], "-P", creds["password"],
         "-t", topic or creds["topic"], "-s"],
        input=payload if isinstance(payload, bytes) else payload.encode(), capture_output=True, timeout=30)


def landed(s: Settings) -> int:
    return (ingest_status(s) or {}).get("landed", 0)


def test_stock_client_to_clinical_store(stack: Settings):
    s = stack
    since = (datetime.now(UTC) - timedelta(days=3)).isoformat()
    rpm(s, "patients", "add", "pt-e2e")
    rpm(s, "patients", "add", "pt-other")
    creds = rpm_json(s, "devices", "add", "bp-e2e-1", "--patient", "pt-e2e", "--kind", "hub", "--since", since)
    assert {"host", "port", "ca_file", "username", "password", "topic"} <= creds.keys()
    assert creds["topic"] == "rpm/v1/devices/bp-e2e-1/vitals" and creds["username"] == "bp-e2e-1"
    other = rpm_json(s, "devices", "add", "bp-e2e-2", "--patient", "pt-other", "--kind", "bp", "--since", since)

    eastern = timezone(timedelta(hours=-5))  # the patient's clock: the offset is kept for local-day questions
    t1 = (datetime.now(UTC) - timedelta(hours=5)).astimezone(eastern).isoformat(timespec="seconds")
    t2 = (datetime.now(UTC) - timedelta(hours=4)).isoformat(timespec="seconds")
    bp = json.dumps({"msg_id": "a1", "metric": "blood_pressure", "measured_at": t1, "unit": "mm[Hg]",
                     "values": {"systolic": 142, "diastolic": 91}, "cuff": "left arm"})
    batch = json.dumps({"readings": [
        {"msg_id": "a2", "metric": "heart_rate", "measured_at": t1, "value": 77, "unit": "/min"},
        {"msg_id": "a3", "metric": "body_temperature", "measured_at": t2, "value": 100.4, "unit": "[degF]"},
        {"msg_id": "a4", "metric": "spo2", "measured_at": t2, "value": 140, "unit": "%"},  # implausible
    ]})
    published = [bp, bp, batch, "this is not json", bp]  # bp three times: counted once
    for payload in published:
        assert mosquitto_pub(creds, payload).returncode == 0
    # Device 1 publishing as device 2: the broker refuses it (MQTT 5 PUBACK 'not authorised').
    spoof = mosquitto_pub(creds, json.dumps({"msg_id": "spoof", "metric": "heart_rate", "value": 60,
                                             "unit": "/min", "measured_at": t2}), topic=other["topic"])
    assert b"not authorized" in spoof.stderr.lower() or b"not authorised" in spoof.stderr.lower()
    wait_until(lambda: landed(s) >= len(published), 20, what="ingest to land the messages")

    run = rpm_json(s, "pipeline", "run")
    assert run["state"] == "success"
    # 2 of 7 items quarantined (29 %): above RPM_QUARANTINE_WARN, below _FAIL — the gate is skipped (pink in the
    # grid), the run succeeds, the rest of the run is untouched.
    assert {t: st for t, st in run["tasks"].items() if st != "success"} == {"quality_gate": "skipped"}, run
    assert run["quality_gate"]["level"] == "warn" and "2 of 7" in run["quality_gate"]["message"]

    acc = rpm_json(s, "accounting")
    assert acc["messages_processed"] == len(published)  # the spoofed publish never reached landing
    assert (acc["received"], acc["loaded"], acc["quarantined"], acc["duplicates"]) == (7, 3, 2, 2)
    assert acc["quarantined_by_reason"] == {"not_json": 1, "plausible_spo2": 1}
    assert acc["balanced"] is True

    with clinical(s, read_only=True) as con:
        rows = con.execute("""SELECT patient_id, device_id, metric, loinc, round(value, 2), diastolic, unit,
                                     utc_offset_min, extra FROM readings ORDER BY metric""").fetchall()
        quarantined = con.execute("SELECT reasons, raw FROM quarantine ORDER BY row_key").fetchall()
    assert [r[:8] for r in rows] == [
        ("pt-e2e", "bp-e2e-1", "blood_pressure", "85354-9", 142.0, 91.0, "mm[Hg]", -300),
        ("pt-e2e", "bp-e2e-1", "body_temperature", "8310-5", 38.0, None, "Cel", 0),  # 100.4 [degF]
        ("pt-e2e", "bp-e2e-1", "heart_rate", "8867-4", 77.0, None, "/min", -300),
    ]
    assert json.loads(rows[0][8]) == {"cuff": "left arm"}  # extra fields are kept, not fatal
    assert sorted(r[0][0] for r in quarantined) == ["not_json", "plausible_spo2"]
    assert b"this is not json" in [bytes(r[1]) for r in quarantined]

    # Re-running changes nothing.
    rpm(s, "pipeline", "run")
    assert rpm_json(s, "accounting") == acc

    # At rest: no device id or value in plaintext, and no way in without the key.
    raw = s.clinical_db.read_bytes()
    assert b"bp-e2e-1" not in raw and b"pt-e2e" not in raw and b"left arm" not in raw
    with pytest.raises(duckdb.Error, match="(?i)encrypt|key"):
        duckdb.connect(str(s.clinical_db), read_only=True)


def test_simulated_fleet_accounting_matches_what_was_published(stack: Settings):
    """A small fleet through the broker and one DAG run: every reading is loaded, duplicate or quarantined
    exactly as the simulator's manifest says."""
    s = stack
    fleet = build_fleet(patients=4, days=2, seed=11)
    manifest = fleet.manifest()
    provision_fleet(s, fleet, days=2)
    sent = publish_fleet(s, fleet, tls=True)
    assert sent["acked"] == sent["published"] == manifest["messages"]
    wait_until(lambda: landed(s) >= sent["published"], 30, what="ingest to land the fleet")
    rpm(s, "pipeline", "run")
    acc = rpm_json(s, "accounting")
    assert acc["received"] == manifest["readings"]
    assert {k: acc[k] for k in ("loaded", "duplicates", "quarantined")} == manifest["expected"]
    assert acc["balanced"] is True
    summary = rpm_json(s, "summary")
    assert len(summary) == manifest["patients"]
