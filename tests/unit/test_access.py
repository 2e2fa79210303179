"""Clinician access (warehouse/access.py): care-team scope on every query, every PHI read audited.

A tmp warehouse with three patients: dr-a cares for p1 and p2, dr-b for p3. Reads come from the published
serving snapshot, so they work while the pipeline holds the warehouse; writes publish a new snapshot.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from core.settings import Settings
from warehouse import registry
from warehouse.access import AccessDenied, ClinicianSession
from warehouse.alerts import refresh_alerts
from warehouse.audit import AuditLog
from warehouse.db import clinical
from warehouse.serving import current_snapshot, publish_snapshot, serving

H = timedelta(hours=1)


@pytest.fixture
def ward(settings: Settings, insert_reading) -> Settings:
    now = datetime.now(UTC).replace(microsecond=0)
    with clinical(settings) as con:
        registry.upsert_patient(con, "p1", mrn="MRN-1", given_name="Ada", family_name="Lovelace",
                                time_zone="Europe/London", conditions=["hypertension"])
        registry.upsert_patient(con, "p2", mrn="MRN-2", time_zone="America/New_York")
        registry.upsert_patient(con, "p3", mrn="MRN-3")
        registry.add_clinician(con, "dr-a", "A. Clinician", "physician")
        registry.add_clinician(con, "dr-b", "B. Clinician", "nurse")
        for clinician, patient in (("dr-a", "p1"), ("dr-a", "p2"), ("dr-b", "p3")):
            assert registry.assign(con, clinician, patient) is True
        insert_reading(con, "p1", "heart_rate", 72, now - 2 * H)
        insert_reading(con, "p1", "blood_pressure", 150, now - H, diastolic=95)   # bp_stage2
        insert_reading(con, "p2", "spo2", 97, now - 3 * H)
        insert_reading(con, "p3", "heart_rate", 140, now - H)                       # hr_high
        refresh_alerts(con)
        publish_snapshot(settings, con)
    return settings


def audit_records(s: Settings) -> list[dict]:
    return AuditLog(s).records()


def alert_id(s: Settings, patient_id: str) -> str:
    with serving(s) as con:
        [(aid,)] = con.execute("SELECT alert_id FROM alerts WHERE patient_id = ?", [patient_id]).fetchall()
    return aid


# --- scope --------------------------------------------------------------------------------------------------


def test_patients_lists_only_the_care_team(ward):
    rows = ClinicianSession(ward, "dr-a").patients()
    assert [r["patient_id"] for r in rows] == ["p1", "p2"]
    p1 = rows[0]
    assert (p1["mrn"], p1["given_name"], p1["conditions"], p1["open_alerts"], p1["readings_30d"]) == (
        "MRN-1", "Ada", ["hypertension"], 1, 2)
    assert [r["patient_id"] for r in ClinicianSession(ward, "dr-b").patients()] == ["p3"]


@pytest.mark.parametrize(("call", "action"), [
    (lambda s: s.patient("p3"), "patient"),
    (lambda s: s.export_fhir("p3"), "export-fhir"),
    (lambda s: s.log_time("p3", 10, True), "log-time"),
])
def test_patient_outside_care_team_is_denied_and_audited(ward, call, action):
    before = len(audit_records(ward))
    with pytest.raises(AccessDenied):
        call(ClinicianSession(ward, "dr-a"))
    records = audit_records(ward)
    assert len(records) == before + 1
    r = records[-1]
    assert (r["actor"], r["action"], r["patients"], r["rows"]) == ("dr-a", action, ["p3"], 0)
    assert r["outcome"].startswith("denied")
    assert AuditLog(ward).verify()["ok"] is True


def test_unknown_clinician_is_denied_and_audited(ward):
    session = ClinicianSession(ward, "dr-nobody")
    for call in (session.patients, session.alerts, lambda: session.patient("p1"),
                 lambda: session.export_fhir("p1")):
        with pytest.raises(AccessDenied):
            call()
    records = audit_records(ward)
    assert len(records) == 4
    assert all(r["actor"] == "dr-nobody" and r["outcome"].startswith("denied") and r["rows"] == 0
               for r in records)
    assert [r["action"] for r in records] == ["patients", "alerts", "patient", "export-fhir"]


# --- every read audited once --------------------------------------------------------------------------------


def test_every_successful_read_appends_exactly_one_audit_record(ward):
    session = ClinicianSession(ward, "dr-a")

    def audited(call):
        before = len(audit_records(ward))
        result = call()
        records = audit_records(ward)
        assert len(records) == before + 1
        assert (records[-1]["actor"], records[-1]["outcome"]) == ("dr-a", "ok")
        return result, records[-1]

    rows, r = audited(session.patients)
    assert (r["action"], r["patients"], r["rows"], r["query"]) == ("patients", ["p1", "p2"], 2,
                                                                    {"view": "patients", "via": "cli"})

    view, r = audited(lambda: session.patient("p1"))
    assert [v["metric"] for v in view["latest"]] == ["blood_pressure", "heart_rate"]
    assert [a["rule"] for a in view["alerts"]] == ["bp_stage2"]
    expected_rows = (len(view["latest"]) + len(view["daily"]) + len(view["trends"]) + len(view["alerts"])
                     + (1 if view["glucose"] else 0))
    assert (r["action"], r["patients"], r["rows"]) == ("patient", ["p1"], expected_rows)
    assert r["query"] == {"view": "patient", "patient_id": "p1", "days": 30, "via": "cli"}

    alerts, r = audited(session.alerts)
    assert [(a["patient_id"], a["rule"]) for a in alerts] == [("p1", "bp_stage2")]
    assert (r["action"], r["patients"], r["rows"]) == ("alerts", ["p1"], 1)

    bundle, r = audited(lambda: session.export_fhir("p1"))
    assert len(bundle["entry"]) == 2
    assert (r["action"], r["patients"], r["rows"]) == ("export-fhir", ["p1"], 2)

    report, r = audited(lambda: session.billing(None))
    assert sorted(x["patient_id"] for x in report) == ["p1", "p2"]
    assert (r["action"], r["patients"], r["rows"]) == ("billing", sorted(x["patient_id"] for x in report), 2)

    v = AuditLog(ward).verify()
    assert (v["ok"], v["records"]) == (True, 5)


def test_unassigned_clinician_loses_access(ward):
    session = ClinicianSession(ward, "dr-a")
    assert session.patient("p1")["patient"]["patient_id"] == "p1"
    with clinical(ward) as con:
        assert registry.unassign(con, "dr-a", "p1") is True
        assert registry.unassign(con, "dr-a", "p1") is False
        assert registry.care_team_patients(con, "dr-a") == ["p2"]
        publish_snapshot(ward, con)
    assert [r["patient_id"] for r in session.patients()] == ["p2"]
    with pytest.raises(AccessDenied):
        session.patient("p1")
    with pytest.raises(AccessDenied):
        session.export_fhir("p1")
    assert audit_records(ward)[-1]["outcome"].startswith("denied")


def test_reads_work_while_the_warehouse_is_held_by_a_writer(ward):
    session = ClinicianSession(ward, "dr-a")
    with clinical(ward) as writer:
        # the writer changes the warehouse but has not published yet: readers see the last snapshot
        registry.upsert_patient(writer, "p4")
        registry.assign(writer, "dr-a", "p4")
        assert [r["patient_id"] for r in session.patients()] == ["p1", "p2"]
        assert session.patient("p2")["patient"]["mrn"] == "MRN-2"
        assert [a["rule"] for a in session.alerts()] == ["bp_stage2"]
        publish_snapshot(ward, writer)
        assert [r["patient_id"] for r in session.patients()] == ["p1", "p2", "p4"]
    assert [r["action"] for r in audit_records(ward)] == ["patients", "patient", "alerts", "patients"]


# --- writes -------------------------------------------------------------------------------------------------


def test_acknowledge_writes_publishes_and_is_audited(ward):
    session = ClinicianSession(ward, "dr-a")
    aid = alert_id(ward, "p1")
    snapshot = current_snapshot(ward)

    result = session.acknowledge(aid, "called the patient")

    assert result == {"alert_id": aid, "patient_id": "p1", "rule": "bp_stage2", "resolved": False}
    assert current_snapshot(ward) != snapshot
    with serving(ward) as con:
        row = con.execute("SELECT acknowledged_by, ack_note, acknowledged_at IS NOT NULL, resolved_at "
                          "FROM alerts WHERE alert_id = ?", [aid]).fetchone()
    assert row == ("dr-a", "called the patient", True, None)
    r = audit_records(ward)[-1]
    assert (r["actor"], r["action"], r["patients"], r["rows"], r["outcome"]) == ("dr-a", "ack", ["p1"], 1, "ok")
    assert r["query"] == {"action": "ack", "alert_id": aid, "note": "called the patient", "before": None,
                          "via": "cli"}


def test_a_second_acknowledgement_keeps_the_first_and_its_note(ward):
    """The hostile review's F15: rn-b's bare ack after dr-a's erased dr-a's note, which no record kept."""
    from warehouse.alerts import acknowledgements

    aid = alert_id(ward, "p1")
    with clinical(ward) as con:
        registry.add_clinician(con, "rn-b", "B. Nurse", "nurse")
        registry.assign(con, "rn-b", "p1")
        publish_snapshot(ward, con)
    ClinicianSession(ward, "dr-a").acknowledge(aid, "called patient; sent to ER, BP 210/130")
    ClinicianSession(ward, "rn-b").acknowledge(aid)

    with serving(ward) as con:
        shown = con.execute("SELECT acknowledged_by, ack_note FROM alerts WHERE alert_id = ?", [aid]).fetchone()
        history = acknowledgements(con, aid)
    assert shown == ("rn-b", None)  # the alert shows its latest acknowledgement
    assert [(a["clinician_id"], a["note"], a["rule"], a["resolved"]) for a in history] == [
        ("dr-a", "called patient; sent to ER, BP 210/130", "bp_stage2", False), ("rn-b", None, "bp_stage2", False)]
    first, second = [r for r in audit_records(ward) if r["action"] == "ack"]
    assert first["query"]["note"] == "called patient; sent to ER, BP 210/130" and first["query"]["before"] is None
    assert (second["actor"], second["query"]["note"]) == ("rn-b", None)
    assert second["query"]["before"]["acknowledged_by"] == "dr-a"
    assert second["query"]["before"]["ack_note"] == "called patient; sent to ER, BP 210/130"


@pytest.mark.parametrize("note", ["line\nforged", "x" * 1001])
def test_an_unprintable_or_overlong_note_is_refused_and_nothing_is_written(ward, note):
    aid = alert_id(ward, "p1")
    with pytest.raises(ValueError, match="note"):
        ClinicianSession(ward, "dr-a").acknowledge(aid, note)
    with serving(ward) as con:
        assert con.execute("SELECT count(*) FROM alert_acks").fetchone() == (0,)
    assert audit_records(ward) == []


def test_acknowledge_outside_care_team_is_denied(ward):
    aid = alert_id(ward, "p3")
    snapshot = current_snapshot(ward)
    with pytest.raises(AccessDenied):
        ClinicianSession(ward, "dr-a").acknowledge(aid)
    assert current_snapshot(ward) == snapshot
    with clinical(ward) as con:
        assert con.execute("SELECT acknowledged_by FROM alerts WHERE alert_id = ?", [aid]).fetchone() == (None,)
    r = audit_records(ward)[-1]
    assert (r["action"], r["patients"]) == ("ack", ["p3"]) and r["outcome"].startswith("denied")


def test_acknowledge_unknown_alert_raises_key_error(ward):
    with pytest.raises(KeyError):
        ClinicianSession(ward, "dr-a").acknowledge("no-such-alert")


def test_log_time_writes_publishes_and_is_audited(ward):
    session = ClinicianSession(ward, "dr-a")
    snapshot = current_snapshot(ward)
    at = datetime(2026, 3, 2, 15, 30, tzinfo=UTC)

    result = session.log_time("p2", 25, True, note="phone review", occurred_at=at)

    assert {k: result[k] for k in ("patient_id", "minutes", "interactive")} == {
        "patient_id": "p2", "minutes": 25, "interactive": True}
    assert current_snapshot(ward) != snapshot
    with serving(ward) as con:
        rows = con.execute("SELECT CAST(interaction_id AS VARCHAR), patient_id, clinician_id, minutes, "
                           "interactive, occurred_at, note FROM interactions").fetchall()
    assert rows == [(result["interaction_id"], "p2", "dr-a", 25, True, at, "phone review")]
    r = audit_records(ward)[-1]
    assert (r["actor"], r["action"], r["patients"], r["rows"], r["outcome"]) == (
        "dr-a", "log-time", ["p2"], 1, "ok")
    assert r["query"] == {"action": "log-time", "patient_id": "p2", "minutes": 25, "interactive": True,
                          "via": "cli"}


@pytest.mark.parametrize("minutes", [0, -5])
def test_log_time_rejects_non_positive_minutes(ward, minutes):
    snapshot = current_snapshot(ward)
    with pytest.raises(ValueError, match="between 1 and 1440"):
        ClinicianSession(ward, "dr-a").log_time("p1", minutes, True)
    assert current_snapshot(ward) == snapshot
    assert audit_records(ward) == []
    with clinical(ward) as con:
        assert con.execute("SELECT count(*) FROM interactions").fetchone() == (0,)


# --- writes at the same moment (the hostile review's F8: 7 of 8 simultaneous time entries got a 500) -------


def test_simultaneous_writes_of_one_care_team_are_all_written_and_audited(ward):
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    aid = alert_id(ward, "p1")
    barrier = Barrier(8)

    def write(i: int) -> dict:
        session = ClinicianSession(ward, "dr-a", via="api")
        barrier.wait()
        return session.acknowledge(aid, f"note {i}") if i % 4 == 0 else session.log_time("p1", 1, False)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(write, range(8)))
    assert len(results) == 8
    with serving(ward) as con:
        assert con.execute("SELECT count(*) FROM interactions WHERE patient_id = 'p1'").fetchone() == (6,)
    assert sorted(r["action"] for r in audit_records(ward)) == ["ack"] * 2 + ["log-time"] * 6
    assert AuditLog(ward).verify()["ok"] is True
