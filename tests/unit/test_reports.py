"""Telehealth reports: hand-computed figures for twelve enrolled people, and small-cell suppression.

Twelve people is one more than the CMS cell-size floor, so some cells of the fixture are published and others
are suppressed — alone, or with the cell that a total would give them back by. Education and appointments sit
on fixed dates; adherence and connectivity are about "the last 30 days", so their readings are placed relative
to now. The pipeline report reads the run records.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import random
import statistics
import subprocess
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import duckdb
import pytest

from core.settings import Settings
from rpmctl.views.reports import render
from tests.conftest import RPM
from warehouse.db import clinical
from warehouse.registry import enroll, upsert_patient
from warehouse.reports import REPORTS, SUPPRESS_BELOW, UNPUBLISHED, Spec, audit, report, suppress, write_csv
from warehouse.reports import pipeline_runs as pipeline_runs_of
from warehouse.serving import publish_snapshot
from warehouse.telehealth import open_telehealth, pseudonym, pseudonym_key, publish_telehealth

NOW = datetime.now(UTC).replace(microsecond=0)
TODAY = NOW.date()
PEOPLE = [f"p{i:02d}" for i in range(1, 13)]  # p01..p12: enrolled now
W1, W2 = date(2026, 3, 2), date(2026, 3, 9)   # Mondays
# Enrolment -> first transmitted reading, hours, for p01..p12 and p14 (enrolment since closed).
ONBOARDING_HOURS = dict(zip([*PEOPLE, "p14"], [1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377], strict=True))
ONBOARDED_AT = NOW - timedelta(days=50)

_n = itertools.count()


def at(day: date, hour: int = 12, minute: int = 0) -> datetime:
    return datetime.combine(day, time(hour, minute), tzinfo=UTC)


def days_ago(k: int) -> datetime:
    """00:30 UTC on the UTC date k days before today: always in the past, always on that date."""
    return at(TODAY - timedelta(days=k), 0, 30)


def add_reading(con: duckdb.DuckDBPyConnection, patient_id: str, device_id: str, measured_at: datetime,
                manual: bool = False) -> None:
    n = next(_n)
    con.execute("""
        INSERT INTO readings (reading_id, patient_id, device_id, metric, loinc, value, unit, unit_sent,
                              measured_at, utc_offset_min, received_at, loaded_at, msg_id, segment, record_no,
                              item_no, manual)
        VALUES (?, ?, ?, 'heart_rate', '8867-4', 72, '/min', '/min', ?, 0, ?, ?, ?, 'seg-1', ?, 0, ?)""",
        [f"r-{n:06d}", patient_id, device_id, measured_at, measured_at, measured_at, f"m-{n}", n, manual])


def add_event(con: duckdb.DuckDBPyConnection, patient_id: str, event: str, occurred_at: datetime, *,
              device_id: str | None = None, offset_min: int = 0, **fields: Any) -> None:
    n = next(_n)
    row = {"event_id": f"e-{n:06d}", "patient_id": patient_id, "device_id": device_id or f"app-{patient_id}",
           "channel": "status" if event == "device_status" else "events", "event": event,
           "occurred_at": occurred_at, "utc_offset_min": offset_min, "received_at": occurred_at,
           "loaded_at": occurred_at, "msg_id": f"m-{n}", "segment": "seg-2", "record_no": n, "item_no": 0,
           **fields}
    con.execute(f"INSERT INTO telehealth_events ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                list(row.values()))


def appointment(con: duckdb.DuckDBPyConnection, patient_id: str, appointment_id: str,
                *events: tuple[str, datetime, str | None]) -> None:
    for event, when, modality in events:
        add_event(con, patient_id, f"appointment_{event}", when, appointment_id=appointment_id, modality=modality)


# --- the fixture ----------------------------------------------------------------------------------------------


def registry(con: duckdb.DuckDBPyConnection) -> None:
    for pid in [*PEOPLE, "p14"]:
        upsert_patient(con, pid, time_zone="UTC")
        enroll(con, f"cuff-{pid}", pid, kind="bp",
               valid_from=ONBOARDED_AT - timedelta(hours=ONBOARDING_HOURS[pid]))
        add_reading(con, pid, f"cuff-{pid}", ONBOARDED_AT)  # the first transmitted reading
    upsert_patient(con, "p13", time_zone="UTC")  # on the registry, never enrolled
    con.execute("UPDATE enrollments SET valid_to = ? WHERE patient_id = 'p14'", [NOW - timedelta(days=1)])
    for pid in ("p01", "p02", "p03", "p06"):
        enroll(con, f"scale-{pid}", pid, kind="scale", valid_from=NOW - timedelta(days=45))
    con.execute("INSERT INTO devices (device_id, kind) VALUES ('scale-stock', 'scale')")  # never issued


def adherence_readings(con: duckdb.DuckDBPyConnection) -> None:
    """Transmitted days in the last 30 (today = day 0, window = days 0..29)."""
    def transmit(pid: str, ks, device: str | None = None, manual: bool = False) -> None:
        for k in ks:
            add_reading(con, pid, device or f"cuff-{pid}", days_ago(k), manual=manual)

    transmit("p01", range(1, 21))                         # 20 days: adherent
    for pid in ("p02", "p03", "p04", "p05"):
        transmit(pid, range(1, 17))                       # exactly 16: adherent
    transmit("p06", range(1, 9))                          # 8 days on the cuff ...
    transmit("p06", range(1, 17), device="scale-p06")     # ... and 16 on the scale, 8 the same days: 16
    transmit("p07", range(14, 30))                        # 16, the oldest on day 29: adherent
    transmit("p08", range(1, 16))                         # 15 transmitted ...
    transmit("p08", range(16, 21), manual=True)           # ... + 5 keyed in by hand: not adherent
    transmit("p09", range(1, 16))                         # 15 in the window ...
    transmit("p09", [30])                                 # ... + day 30, just outside it
    transmit("p10", range(1, 11))
    transmit("p12", range(1, 6))                          # p11: nothing in the window
    transmit("p14", range(1, 21))                         # adherent but no longer enrolled


def connectivity(con: duckdb.DuckDBPyConnection) -> None:
    def hours_ago(h: float) -> datetime:
        return NOW - timedelta(hours=h)

    # scale-p01: silences 60 h (ended 740 h ago: before the window), 60 h (straddles the window start),
    # 80 h, 20 h (no gap), 50 h, 528 h; seen 2 h ago by a reading and 30 min ago by a status report.
    for h in (800, 740, 680, 600, 580, 530, 2):
        add_reading(con, "p01", "scale-p01", hours_ago(h))
    add_event(con, "p01", "device_status", hours_ago(100), device_id="scale-p01", battery_pct=80.0,
              firmware="1.2.0", signal_dbm=-60.0)
    add_event(con, "p01", "device_status", hours_ago(1), device_id="scale-p01", battery_pct=15.0,
              firmware="1.3.1")
    add_event(con, "p01", "device_status", hours_ago(0.5), device_id="scale-p01", signal_dbm=-80.0)
    # scale-p02: two readings 100 h apart, silent for the last 100 h.
    for h in (200, 100):
        add_reading(con, "p02", "scale-p02", hours_ago(h))
    # scale-p03: reports status, never a reading; 20 % is not low.
    add_event(con, "p03", "device_status", hours_ago(30), device_id="scale-p03", battery_pct=20.0, firmware="1.3.1")
    for i, pid in enumerate(PEOPLE):
        add_event(con, pid, "device_status", hours_ago(5), device_id=f"cuff-{pid}", battery_pct=70.0,
                  signal_dbm=-70.0, firmware="2.4.1" if i < 11 else "2.5.0")


def education(con: duckdb.DuckDBPyConnection) -> None:
    salt, meds = "salt-and-blood-pressure", "taking-your-medications"
    for pid in PEOPLE[:11]:
        add_event(con, pid, "education_viewed", at(W1 + timedelta(days=1)), module=salt, minutes=5.0)
        add_event(con, pid, "education_completed", at(W1 + timedelta(days=2)), module=salt, minutes=10.0)
    add_event(con, "p01", "education_viewed", at(W1 + timedelta(days=3)), module=salt, minutes=2.0)  # again
    # Sunday 22:00 in New York is Monday 03:00 UTC: the patient's week W1, not W2.
    add_event(con, "p12", "education_viewed", at(W2, 3), offset_min=-300, module=salt, minutes=5.0)
    add_event(con, "p01", "education_viewed", at(W2 + timedelta(days=2)), module=salt, minutes=3.0)
    for pid in PEOPLE[:5]:
        add_event(con, pid, "education_viewed", at(W1), module=meds, minutes=4.0)
    for pid in PEOPLE[:3]:
        add_event(con, pid, "education_completed", at(W1 + timedelta(days=1)), module=meds, minutes=6.0)
    add_event(con, "p12", "education_completed", at(W1 + timedelta(days=4)), module=meds)  # no view, no minutes


def appointments(con: duckdb.DuckDBPyConnection) -> None:
    t0, t1, t2 = at(W1), at(W1 + timedelta(days=2)), at(W2 + timedelta(days=1))
    owner = itertools.cycle(PEOPLE)
    # video: 13 attended, 11 no-show, 1 cancelled, 2 still booked = 27
    # Marked no-show, then corrected to attended; inserted out of order: the last *occurred* event counts.
    appointment(con, "p01", "apt-a", ("attended", t2, "video"), ("scheduled", t0, "video"), ("no_show", t1, "video"))
    appointment(con, "p02", "apt-d", ("scheduled", t1, "video"), ("attended", t1, "video"))  # same instant
    for i in range(11):
        appointment(con, next(owner), f"apt-va{i}", ("scheduled", t0, "video"), ("attended", t1, "video"))
    for i in range(11):
        appointment(con, next(owner), f"apt-vn{i}", ("scheduled", t0, "video"), ("no_show", t1, "video"))
    appointment(con, "p03", "apt-vc", ("scheduled", t0, "video"), ("cancelled", t1, "video"))
    # Cancelled, then booked again: still booked.
    appointment(con, "p04", "apt-b", ("scheduled", t0, "video"), ("cancelled", t0 + timedelta(hours=1), "video"),
                ("scheduled", t1, "video"))
    appointment(con, "p05", "apt-vs", ("scheduled", t0, "video"))
    # phone: 2 attended (one booked as video, moved to phone), 1 no-show, 1 cancelled = 4
    appointment(con, "p06", "apt-c", ("scheduled", t0, "video"), ("attended", t1, "phone"))
    appointment(con, "p07", "apt-pa", ("scheduled", t0, "phone"), ("attended", t1, "phone"))
    appointment(con, "p08", "apt-pn", ("scheduled", t0, "phone"), ("no_show", t1, "phone"))
    appointment(con, "p09", "apt-pc", ("scheduled", t0, "phone"), ("cancelled", t1, "phone"))
    # in person: 1 booked, 1 cancelled by an event that does not repeat the modality = 2
    appointment(con, "p10", "apt-is", ("scheduled", t0, "in_person"))
    appointment(con, "p11", "apt-e", ("scheduled", t0, "in_person"), ("cancelled", t1, None))


LONG_RUN_ID = "manual__2026-11-27T10:00:00.123456+00:00"  # as Airflow names a triggered run: printed whole


def pipeline_runs(con: duckdb.DuckDBPyConnection) -> None:
    """Three runs: a success 2 h ago, a failure 1 h ago, a success 3 days ago."""
    start = NOW - timedelta(hours=2, seconds=42.5)
    con.execute("""INSERT INTO pipeline_runs (run_id, state, started_at, finished_at, segments, messages, received,
                                              loaded, quarantined, duplicates, quarantined_by_rule, task_seconds,
                                              measured_to_received_p50_s, measured_to_received_p95_s,
                                              received_to_loaded_p50_s, received_to_loaded_p95_s,
                                              measured_to_loaded_p50_s, measured_to_loaded_p95_s)
                   VALUES ('run-1', 'success', ?, ?, 4, 120, 130, 125, 3, 2, '{"plausible_heart_rate": 3}',
                           '{"load": 1.5, "validate": 0.25}', 2.0, 30.0, 40.0, 90.0, 42.0, 120.0)""",
                [start, start + timedelta(seconds=42.5)])
    con.execute("""INSERT INTO pipeline_runs (run_id, state, started_at, finished_at, failed_task, error)
                   VALUES ('run-2', 'failed', NULL, ?, 'load', 'ConstraintException: patient_id p01')""",
                [NOW - timedelta(hours=1)])
    con.execute("""INSERT INTO pipeline_runs (run_id, state, started_at, finished_at, received, loaded, quarantined,
                                              duplicates)
                   VALUES (?, 'success', ?, ?, 10, 10, 0, 0)""",
                [LONG_RUN_ID, NOW - timedelta(days=3, seconds=20), NOW - timedelta(days=3)])


@pytest.fixture(scope="module")
def s(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    settings = Settings(home=tmp_path_factory.mktemp("reports") / "var")
    with clinical(settings) as con:
        for build in (registry, adherence_readings, connectivity, education, appointments, pipeline_runs):
            build(con)
    publish_snapshot(settings)
    publish_telehealth(settings)
    return settings


def by(rows: list[dict], *keys: str) -> dict:
    return {tuple(r[k] for k in keys) if len(keys) > 1 else r[keys[0]]: r for r in rows}


# --- education ------------------------------------------------------------------------------------------------


def test_education_weekly_raw(s):
    rows = by(report(s, "education"), "module", "week")
    assert set(rows) == {("salt-and-blood-pressure", W1), ("salt-and-blood-pressure", W2),
                         ("taking-your-medications", W1)}
    salt = rows["salt-and-blood-pressure", W1]
    # p01..p11 viewed and completed (p01 viewed twice), p12 viewed late on Sunday, local time.
    assert (salt["people_viewed"], salt["people_completed"], salt["people_engaged"]) == (12, 11, 12)
    assert salt["completion_rate"] == pytest.approx(11 / 12)
    assert salt["total_minutes"] == 11 * 15 + 2 + 5
    assert salt["median_minutes_per_person"] == 15.0  # [5, 15 x 10, 17]
    meds = rows["taking-your-medications", W1]
    # viewed p01..p05; completed p01..p03 and p12, who never logged a view
    assert (meds["people_viewed"], meds["people_completed"], meds["people_engaged"]) == (5, 4, 6)
    assert meds["completion_rate"] == pytest.approx(4 / 6)
    assert meds["total_minutes"] == 3 * 10 + 2 * 4
    assert meds["median_minutes_per_person"] == 10.0  # [4, 4, 10, 10, 10]; p12 reported no minutes
    later = rows["salt-and-blood-pressure", W2]
    assert (later["people_viewed"], later["people_completed"], later["completion_rate"]) == (1, 0, 0.0)


def test_education_weekly_published(s):
    rows = by(report(s, "education", publish=True), "module", "week")
    salt = rows["salt-and-blood-pressure", W1]
    assert (salt["people_viewed"], salt["people_completed"], salt["people_engaged"]) == (12, 11, 12)
    assert salt["completion_rate"] == pytest.approx(11 / 12)
    assert (salt["total_minutes"], salt["median_minutes_per_person"]) == (172.0, 15.0)
    for cell in (rows["taking-your-medications", W1], rows["salt-and-blood-pressure", W2]):
        assert (cell["people_viewed"], cell["people_completed"], cell["people_engaged"]) == ("<11",) * 3
        assert (cell["completion_rate"], cell["total_minutes"], cell["median_minutes_per_person"]) == (None,) * 3


# --- appointments ---------------------------------------------------------------------------------------------

COUNTS = ("appointments", "scheduled", "attended", "no_show", "cancelled")


def test_appointments_by_modality_raw(s):
    rows = report(s, "appointments")
    assert [r["modality"] for r in rows] == ["video", "phone", "in_person", "all"]
    got = {r["modality"]: tuple(r[c] for c in COUNTS) for r in rows}
    assert got == {"video": (27, 2, 13, 11, 1), "phone": (4, 0, 2, 1, 1), "in_person": (2, 1, 0, 0, 1),
                   "all": (33, 3, 15, 12, 3)}
    rates = {r["modality"]: (r["completion_rate"], r["no_show_rate"]) for r in rows}
    assert rates["video"] == pytest.approx((13 / 24, 11 / 24))
    assert rates["phone"] == pytest.approx((2 / 3, 1 / 3))
    assert rates["in_person"] == (None, None)  # nothing was due yet
    assert rates["all"] == pytest.approx((15 / 27, 12 / 27))


def test_appointment_outcome_is_its_last_event(s):
    key = pseudonym_key(s)
    con = open_telehealth(s)
    try:
        outcomes = dict(con.execute("SELECT appointment_key, outcome || '/' || modality "
                                    "FROM appointments").fetchall())
    finally:
        con.close()
    assert len(outcomes) == 33

    def outcome(pid: str, apt: str) -> str:
        return outcomes[pseudonym(key, "appointment", f"{pid}|{apt}")]

    assert outcome("p01", "apt-a") == "attended/video"    # no-show corrected later
    assert outcome("p04", "apt-b") == "scheduled/video"   # cancelled, then booked again
    assert outcome("p06", "apt-c") == "attended/phone"    # moved from video to phone
    assert outcome("p02", "apt-d") == "attended/video"    # booked and attended at the same instant
    assert outcome("p11", "apt-e") == "cancelled/in_person"


def test_appointments_weekly_follow_the_outcome_week(s):
    rows = [r for r in report(s, "appointments_weekly") if r["modality"] == "all"]
    assert [(r["week"], r["appointments"], r["attended"]) for r in rows] == [(W1, 32, 14), (W2, 1, 1)]


def test_appointments_published(s):
    """video's 27 = 2 + 13 + 11 + 1 would bound its two small cells to 3 between them, and 'all' minus video
    would bound phone's and in-person's: at this volume every count of 11 or more is withheld too."""
    rows = by(report(s, "appointments", publish=True), "modality")
    assert tuple(rows["video"][c] for c in COUNTS) == ("suppressed", "<11", "suppressed", "suppressed", "<11")
    assert (rows["video"]["completion_rate"], rows["video"]["no_show_rate"]) == (None, None)
    assert tuple(rows["all"][c] for c in COUNTS) == ("suppressed", "<11", "suppressed", "suppressed", "<11")
    for small in ("phone", "in_person"):
        assert tuple(rows[small][c] for c in COUNTS) == ("<11",) * 5
        assert (rows[small]["completion_rate"], rows[small]["no_show_rate"]) == (None, None)


# --- devices ----------------------------------------------------------------------------------------------------


def days_since(ts: datetime) -> int:
    """Whole UTC days from ``ts`` to today: how the view counts days since a device was last seen."""
    return (datetime.now(UTC).date() - ts.astimezone(UTC).date()).days


def test_connectivity_internal_view(s):
    key = pseudonym_key(s)
    rows = report(s, "connectivity")
    assert len(rows) == 13 + 4 + 1  # cuffs p01..p14 but p13, four scales, one in stock
    dev = by(rows, "device_key")

    def device(device_id: str) -> dict:
        return dev[pseudonym(key, "device", device_id)]

    one = device("scale-p01")
    assert (one["device_kind"], one["assigned"]) == ("scale", True)
    assert (one["gaps_over_24h_30d"], one["gaps_over_72h_30d"], one["ongoing_gap"]) == (4, 2, False)
    assert one["last_reading_on"] == (NOW - timedelta(hours=2)).date()
    assert one["last_seen_on"] == (NOW - timedelta(minutes=30)).date()  # a status report is a sign of life
    assert one["days_since_last_seen"] == days_since(NOW - timedelta(minutes=30))
    assert (one["battery_pct"], one["low_battery"], one["signal_dbm"], one["firmware"]) == (15.0, True, -80.0,
                                                                                          "1.3.1")
    two = device("scale-p02")
    assert (two["gaps_over_24h_30d"], two["gaps_over_72h_30d"], two["ongoing_gap"]) == (2, 2, True)
    assert two["days_since_last_seen"] == days_since(NOW - timedelta(hours=100))
    assert (two["battery_pct"], two["low_battery"], two["firmware"]) == (None, None, None)
    three = device("scale-p03")
    assert (three["last_reading_on"], three["last_seen_on"]) == (None, (NOW - timedelta(hours=30)).date())
    assert (three["gaps_over_24h_30d"], three["battery_pct"], three["low_battery"]) == (0, 20.0, False)
    stock = device("scale-stock")
    assert (stock["assigned"], stock["last_seen_on"], stock["days_since_last_seen"]) == (False, None, None)
    assert rows[0]["last_seen_on"] is None  # never-seen devices first, then the longest silent
    seen = [r["last_seen_on"] for r in rows if r["last_seen_on"] is not None]
    assert seen == sorted(seen)
    assert not [c for c in rows[0] if c.endswith("_at")]  # days, never instants


def band(days: int | None) -> str:
    if days is None:
        return "never"
    return next(name for limit, name in ((0, "today"), (2, "1-2 days"), (7, "3-7 days"), (30, "8-30 days"))
                if days <= limit) if days <= 30 else "over 30 days"


def test_connectivity_is_published_by_device_kind_not_per_device(s):
    devices = report(s, "connectivity")
    published = report(s, "connectivity", publish=True)
    assert all(set(r) == {"device_kind", "last_seen", "devices", "devices_low_battery", "devices_silent_now"}
               for r in published)
    counts = {(r["device_kind"], r["last_seen"]): r["devices"] for r in published}
    expected: dict[tuple[str, str], int] = {}
    for d in devices:
        for cell in ((d["device_kind"], band(d["days_since_last_seen"])), (d["device_kind"], "all")):
            expected[cell] = expected.get(cell, 0) + 1
    assert set(counts) == set(expected)
    # The bands follow the hour the fixture is built at (NOW is the clock), so whether the audit must also hide
    # the bp total as a complement depends on it: a total is shown, or labelled a complement, never "<11".
    assert expected["bp", "all"] == 13 and counts["bp", "all"] in (13, "suppressed")
    assert counts["scale", "all"] == "<11"
    for cell, n in expected.items():
        shown = counts[cell]
        assert shown == "<11" if n < SUPPRESS_BELOW else shown in (n, "suppressed")
    # No kind's total gives a single hidden band back.
    for kind in ("bp", "scale"):
        bands = [v for (k, b), v in counts.items() if k == kind and b != "all"]
        hidden = [v for v in bands if v in ("<11", "suppressed")]
        assert counts[kind, "all"] in ("<11", "suppressed") or len(hidden) != 1


def test_firmware_spread(s):
    raw = {(r["device_kind"], r["firmware"]): r["devices"] for r in report(s, "firmware")}
    assert raw == {("bp", "2.4.1"): 11, ("bp", "2.5.0"): 1, ("bp", None): 1, ("bp", "all"): 13,
                   ("scale", "1.3.1"): 2, ("scale", None): 3, ("scale", "all"): 5}
    # Never published: per kind its rows add up to the device counts connectivity suppresses when published.
    with pytest.raises(ValueError, match="not for publication"):
        report(s, "firmware", publish=True)


# --- adherence --------------------------------------------------------------------------------------------------


def test_adherence_raw(s):
    [row] = report(s, "adherence")
    assert (row["window_start"], row["window_end"]) == (TODAY - timedelta(days=29), TODAY)
    # p01..p07 of the twelve enrolled; p08 (manual days), p09 (day 30), p10-p12 fall short; p13 and p14 are
    # not enrolled now.
    assert (row["enrolled_people"], row["adherent_people"]) == (12, 7)
    assert row["adherence_share"] == pytest.approx(7 / 12)
    hours = sorted(ONBOARDING_HOURS.values())
    assert row["people_with_first_reading"] == 13
    assert row["median_hours_to_first_reading"] == statistics.median(hours) == 21
    # p90, linear interpolation: rank 0.9 * 12 = 10.8 between 144 and 233
    assert row["p90_hours_to_first_reading"] == pytest.approx(144 + 0.8 * (233 - 144))


def test_adherence_published(s):
    [row] = report(s, "adherence", publish=True)
    assert (row["enrolled_people"], row["adherent_people"], row["adherence_share"]) == (12, "<11", None)
    assert (row["people_with_first_reading"], row["median_hours_to_first_reading"]) == (13, 21)


# --- pipeline ---------------------------------------------------------------------------------------------------


def test_pipeline_runs_newest_first_with_objects_not_json_text(s):
    rows = report(s, "pipeline")
    assert [(r["recency"], r["run_id"], r["state"], r["failed_task"]) for r in rows] == [
        (1, "run-2", "failed", "load"), (2, "run-1", "success", None), (3, LONG_RUN_ID, "success", None)]
    ok = rows[1]
    assert (ok["duration_s"], ok["loaded"], ok["quarantined"], ok["duplicates"]) == (42.5, 125, 3, 2)
    assert (ok["measured_to_loaded_p50_s"], ok["measured_to_loaded_p95_s"]) == (42.0, 120.0)
    assert ok["task_seconds"] == {"load": 1.5, "validate": 0.25}
    assert ok["quarantined_by_rule"] == {"plausible_heart_rate": 3}
    assert ok["finished_at"] == NOW - timedelta(hours=2) and ok["finished_at"].utcoffset() == timedelta(0)
    assert all("error" not in r for r in rows)  # exception text can quote patient ids
    # What --json prints: numbers and objects, no JSON text inside JSON.
    back = json.loads(json.dumps(rows, default=str))
    assert back[1]["task_seconds"] == {"load": 1.5, "validate": 0.25} and back[1]["loaded"] == 125


def test_pipeline_runs_since_and_failed_only(s):
    assert [r["run_id"] for r in pipeline_runs_of(s, since=timedelta(hours=24))] == ["run-2", "run-1"]
    assert [r["run_id"] for r in pipeline_runs_of(s, since=timedelta(minutes=90))] == ["run-2"]
    assert [r["run_id"] for r in pipeline_runs_of(s, failed_only=True)] == ["run-2"]
    assert pipeline_runs_of(s, since=timedelta(minutes=30)) == []


def test_pipeline_report_is_never_published(s):
    with pytest.raises(ValueError, match="not for publication"):
        report(s, "pipeline", publish=True)


def test_pipeline_report_fits_80_columns_and_prints_run_ids_whole(s):
    rows = report(s, "pipeline")
    text = render("pipeline", rows)
    assert max(len(line) for line in text.splitlines()) <= 80
    assert LONG_RUN_ID in text and "run-2" in text
    assert text.splitlines()[0].split()[:2] == ["run", "id"] and "more columns: --wide" in text
    # A 42-character run id still leaves room for when each run finished and which task failed.
    header = next(line for line in text.splitlines() if "state" in line)
    assert "finished" in header and "failed in" in header
    failed = next(line for line in text.splitlines() if line.startswith("run-2 "))
    assert failed.split()[1:5] == ["failed", *(NOW - timedelta(hours=1)).strftime("%Y-%m-%d %H:%M").split(), "load"]
    longer = [{**r, "run_id": f"scheduled__{r['run_id']}__backfill"} for r in rows]  # 64 characters: own line
    two = render("pipeline", longer)
    assert max(len(line) for line in two.splitlines()) <= 80 and f"\n{longer[0]['run_id']}\n  failed " in two
    assert "failed in" in two and " load" in two
    wide = render("pipeline", rows, wide=True)
    assert LONG_RUN_ID in wide and max(len(line) for line in wide.splitlines()) > 80
    assert "task_seconds" in wide and "load=1.5 validate=0.2" in wide  # objects shown as key=value


def rpm(s: Settings, *args: str) -> subprocess.CompletedProcess:
    """The real `rpm` command on this fixture's state, as a practice manager runs it."""
    return subprocess.run([RPM, "reports", *args], env={**os.environ, **s.as_env()}, capture_output=True,
                          text=True, timeout=120)


def test_rpm_reports_pipeline_on_a_terminal_and_as_json(s):
    text = rpm(s, "pipeline")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == "# operations records of the pipeline's runs: no patient data"
    assert max(map(len, lines)) <= 80 and LONG_RUN_ID in text.stdout
    failed = rpm(s, "pipeline", "--failed")
    assert "run-2" in failed.stdout and "run-1" not in failed.stdout
    recent = json.loads(rpm(s, "pipeline", "--since", "24h", "--json").stdout)
    assert [r["run_id"] for r in recent] == ["run-2", "run-1"]
    assert "T" in recent[1]["finished_at"]  # ISO 8601
    assert datetime.fromisoformat(recent[1]["finished_at"]) == NOW - timedelta(hours=2)
    none = rpm(s, "pipeline", "--failed", "--since", "1m")
    assert none.returncode == 0 and none.stdout.splitlines()[1:] == ["no failed runs in the last 1m"]
    assert recent[1]["task_seconds"] == {"load": 1.5, "validate": 0.25} and recent[1]["duration_s"] == 42.5
    assert max(map(len, rpm(s, "pipeline", "--wide").stdout.splitlines())) > 80


@pytest.mark.parametrize(("args", "says"), [
    (("pipeline", "--since", "yesterday"), "is not a duration: use a whole number and m, h or d (30m, 24h, 7d)"),
    (("pipeline", "--since", "0h"), "is not a duration"),
    (("pipeline", "--since", "99999999999d"), "further back than dates go"),
    (("education", "--since", "7d", "--failed"), "--since and --failed apply to the pipeline report only"),
    (("pipeline", "--publish"), "not for publication"),
    (("pipeline", "--csv", ""), "--csv needs a file name"),
])
def test_rpm_reports_refuses_bad_input_in_one_line(s, args, says):
    proc = rpm(s, *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and says in proc.stderr, proc.stderr


def test_rpm_reports_says_which_hipaa_route_its_rows_follow(s):
    practice = rpm(s, "appointments").stdout.splitlines()[0]
    assert practice.startswith("# limited data set (45 CFR 164.514(e))") and "data use agreement only" in practice
    published = rpm(s, "appointments", "--publish").stdout.splitlines()[0]
    assert published.startswith("# published aggregate, no expert determination: counts per week or kind")
    assert "de-identified" not in published and "164.514(b)" not in published  # claims no Safe Harbor status
    assert max(len(practice), len(published)) < 120
    helptext = " ".join(rpm(s, "--help").stdout.split())
    assert "de-identified" not in helptext and "Not an expert determination: week dates remain" in helptext


# --- suppression, rendering, CSV --------------------------------------------------------------------------------


def test_suppression_threshold_is_the_cms_cell_size():
    assert SUPPRESS_BELOW == 11
    spec = Spec("v", "x", counts=("n", "k"), rates={"rate": ("k", "n")}, stats={"median": "n"})
    rows = [{"thing_key": "abc", "n": 11, "k": 11, "rate": 1.0, "median": 3.0},
            {"n": 40, "k": 10, "rate": 0.25, "median": 3.0},
            {"n": 0, "k": 0, "rate": None, "median": None}]
    assert suppress(spec, rows) == [{"n": 11, "k": 11, "rate": 1.0, "median": 3.0},
                                    {"n": 40, "k": "<11", "rate": None, "median": 3.0},
                                    {"n": "<11", "k": "<11", "rate": None, "median": None}]


APPOINTMENTS = REPORTS["appointments"]


def visit(modality: str, scheduled: int, attended: int, no_show: int, cancelled: int) -> dict:
    return {"modality": modality, "appointments": scheduled + attended + no_show + cancelled,
            "scheduled": scheduled, "attended": attended, "no_show": no_show, "cancelled": cancelled,
            "completion_rate": attended / (attended + no_show), "no_show_rate": no_show / (attended + no_show)}


def with_total(*rows: dict) -> list[dict]:
    counts = ("scheduled", "attended", "no_show", "cancelled")
    return [*rows, visit("all", *(sum(r[c] for r in rows) for c in counts))]  # type: ignore[arg-type]


def reader_ranges(spec: Spec, published: list[dict]) -> dict[tuple[int, str], tuple[float, float]]:
    """What a reader of a published table can work out about each "<11" cell, from the table alone: the
    narrowest range its sums and bounds allow, knowing "<11" is 0-10 (1-10 for a row's existence count) and
    "suppressed" at least 11. Written apart from warehouse/reports.py's own audit."""
    from scipy.optimize import linprog

    hidden = [(i, c) for i, r in enumerate(published) for c in spec.counts if isinstance(r[c], str)]
    index = {cell: k for k, cell in enumerate(hidden)}
    ties = [("eq", [(i, total), *((i, p) for p in parts)]) for i in range(len(published))
            for total, parts in spec.sums.items()]
    ties += [("le", [(i, part), (i, whole)]) for i in range(len(published)) for part, whole in spec.within.items()]
    if spec.total:
        column, label = spec.total
        for t_ in (i for i, r in enumerate(published) if r[column] == label):
            group = [i for i, r in enumerate(published) if r[column] != label
                     and all(r[g] == published[t_][g] for g in spec.group_by)]
            ties += [("eq", [(t_, c), *((i, c) for i in group)]) for c in spec.counts]
    a: dict[str, list] = {"eq": [], "le": []}
    b: dict[str, list] = {"eq": [], "le": []}
    for kind, cells in ties:
        row, rhs = [0.0] * len(hidden), 0.0
        for k, (i, c) in enumerate(cells):
            sign = 1 if k == 0 else -1
            if (i, c) in index:
                row[index[i, c]] += sign
            else:
                rhs -= sign * published[i][c]
        a[kind].append(row)
        b[kind].append(rhs)
    bounds = [((1 if c == spec.exists else 0, 10) if published[i][c] == "<11" else (11, None)) for i, c in hidden]
    lp = {"A_eq": a["eq"] or None, "b_eq": b["eq"] or None, "A_ub": a["le"] or None, "b_ub": b["le"] or None,
          "bounds": bounds, "method": "highs"}
    out = {}
    for cell in hidden:
        if published[cell[0]][cell[1]] == "<11":
            e = [0.0] * len(hidden)
            e[index[cell]] = 1.0
            low, high = linprog(e, **lp), linprog([-x for x in e], **lp)
            assert low.status == 0, cell  # the true table is one the reader must consider
            out[cell] = (low.fun, -high.fun if high.status == 0 else float("inf"))
    return out


def appointment_table(rng: random.Random) -> list[dict]:
    return with_total(*(visit(m, rng.choice([0, 1, 2, 5, 12, 30]), rng.choice([3, 8, 12, 20, 40]),
                              rng.choice([0, 1, 2, 4, 11, 15]), rng.choice([0, 1, 3, 12, 25]))
                        for m in ("video", "phone", "in_person")))


def connectivity_table(rng: random.Random) -> list[dict]:
    rows = []
    for kind in ("bp", "glu"):
        bands = []
        for band_ in ("today", "1-2 days", "3-7 days", "8-30 days", "over 30 days", "never"):
            devices = rng.choice([0, 0, 1, 2, 5, 12, 25, 40])
            if devices:  # a band's row exists only for a device in it
                bands.append({"device_kind": kind, "last_seen": band_, "devices": devices,
                              "devices_low_battery": rng.randint(0, min(devices, rng.choice([0, 1, 3, 12]))),
                              "devices_silent_now": devices if band_ not in ("today", "1-2 days")
                              else rng.randint(0, min(devices, 2))})
        counts = ("devices", "devices_low_battery", "devices_silent_now")
        rows += [*bands, {"device_kind": kind, "last_seen": "all", **{c: sum(b[c] for b in bands) for c in counts}}]
    return rows


def assert_no_small_cell_narrowed(spec: Spec, rows: list[dict]) -> None:
    published = suppress(spec, rows)
    for (i, c), (low, high) in reader_ranges(spec, published).items():
        true = rows[i][c]
        assert low <= true <= high
        assert low <= 1 + 1e-6 and high >= 10 - 1e-6 or all(
            isinstance(published[j][d], str) for j in range(len(rows)) for d in spec.counts
            if rows[j].get(spec.group_by[0]) == rows[i].get(spec.group_by[0]) if spec.group_by), (
            f"{c} of {rows[i]} narrowed to {low}..{high} in {published}")
    for row, out in zip(rows, published, strict=True):  # "suppressed" is never a small count
        assert all(row[c] >= SUPPRESS_BELOW for c in spec.counts if out[c] == "suppressed")


def test_the_reviewers_table_gives_no_small_cell_back():
    """Published as before, phone's 12 appointments and 12 attended gave its other cells (0), and 16 no-shows
    minus in-person's 15 gave video's 1."""
    rows = with_total(visit("video", 1, 12, 1, 0), visit("phone", 0, 12, 0, 0), visit("in_person", 2, 12, 15, 0))
    published = by(suppress(APPOINTMENTS, rows), "modality")
    assert "<11" in (published["phone"]["appointments"], published["phone"]["attended"]) or \
        "suppressed" in (published["phone"]["appointments"], published["phone"]["attended"])
    assert published["video"]["no_show"] == "<11" and "suppressed" in (
        published["all"]["no_show"], published["in_person"]["no_show"])
    assert_no_small_cell_narrowed(APPOINTMENTS, rows)


@pytest.mark.parametrize("seed", range(2))
def test_no_small_appointment_count_can_be_computed_back(seed):
    rng = random.Random(seed)
    for _ in range(8):
        assert_no_small_cell_narrowed(APPOINTMENTS, appointment_table(rng))


@pytest.mark.parametrize("seed", range(2))
def test_no_small_device_count_can_be_computed_back(seed):
    """A band's row exists only for a device in it, and no band has more low-battery or silent devices than
    devices: a reader uses both."""
    spec = REPORTS["connectivity"].published
    assert spec is not None
    rng = random.Random(seed)
    for _ in range(8):
        assert_no_small_cell_narrowed(spec, connectivity_table(rng))


def test_the_audit_knows_a_suppressed_cell_is_at_least_11():
    """5 + 40 + 30 = 75: with 5 alone hidden the total gives it back; with 12 hidden beside it, the reader
    knows 12 is >= 11 ("suppressed", not "<11"), so 5 lies in 1..6; with 40 beside it, in 1..10."""
    spec = Spec("v", "x", counts=("n",), total=("g", "all"), exists="n")
    rows = [{"g": "a", "n": 5}, {"g": "b", "n": 40}, {"g": "c", "n": 30}, {"g": "all", "n": 75}]
    assert audit(spec, rows, {(0, "n")}, set()) == {(0, "n"): (5, 5)}
    assert audit(spec, rows, {(0, "n")}, {(1, "n")}) == {(0, "n"): (1, 10)}
    near = [{**r, "n": 12} if r["g"] == "b" else {**r, "n": 47} if r["g"] == "all" else r for r in rows]
    assert audit(spec, near, {(0, "n")}, {(1, "n")}) == {(0, "n"): (1, 6)}
    assert [r["n"] for r in suppress(spec, near)] == ["<11", 12, "suppressed", 47]  # 30 has the room


@pytest.mark.parametrize("name", sorted(set(REPORTS) - set(UNPUBLISHED)))
def test_published_reports_carry_no_keys_and_no_small_counts(s, name):
    spec = REPORTS[name].published or REPORTS[name]
    for row in report(s, name, publish=True):
        assert not [c for c in row if c.endswith("_key")]
        for c in spec.counts:
            assert row[c] in ("<11", "suppressed") or row[c] >= SUPPRESS_BELOW


def test_unknown_report():
    with pytest.raises(ValueError, match="education"):
        report(Settings(), "everything")


def test_render_aligns_columns(s):
    rows = suppress(APPOINTMENTS, with_total(visit("video", 0, 20, 15, 15), visit("phone", 20, 11, 12, 12),
                                             visit("in_person", 11, 12, 13, 14)))
    text = render("appointments", rows)
    lines = [line for i, line in enumerate(text.splitlines()) if i != 1]  # without the rule under the header
    assert len(lines) == 1 + len(rows)
    header = lines[0]
    assert header.split() == list(rows[0])
    assert "47.8%" in text and "<11" in text and "suppressed" in text  # rates as percentages
    end = header.index("cancelled") + len("cancelled")  # right-aligned numbers end under their header
    assert all(line[end - 1] != " " and line[end] == " " for line in lines[1:])
    assert all(line.startswith(r["modality"] + " ") for line, r in zip(lines[1:], rows, strict=True))
    assert render("firmware", []) == "no firmware data"


def test_csv_round_trip(s, tmp_path):
    rows = report(s, "appointments", publish=True)
    path = write_csv(rows, tmp_path / "appointments.csv")
    with path.open(newline="") as f:
        back = list(csv.DictReader(f))
    assert [r["modality"] for r in back] == [r["modality"] for r in rows]
    video = back[0]
    assert (video["appointments"], video["scheduled"], video["cancelled"]) == ("suppressed", "<11", "<11")
    assert back[1]["completion_rate"] == ""  # None
    raw = report(s, "appointments")
    with write_csv(raw, tmp_path / "raw.csv").open(newline="") as f:
        assert float(next(csv.DictReader(f))["completion_rate"]) == raw[0]["completion_rate"]

    devices = report(s, "connectivity")
    path = write_csv(devices, tmp_path / "devices.csv")
    with path.open(newline="") as f:
        back = list(csv.DictReader(f))
    assert list(back[0]) == list(devices[0])
    for got, want in zip(back, devices, strict=True):
        assert got["device_key"] == want["device_key"]
        seen = want["last_seen_on"]
        assert (date.fromisoformat(got["last_seen_on"]) if got["last_seen_on"] else None) == seen


@pytest.mark.parametrize("text", ["=HYPERLINK(\"http://x\",\"Jane\")", "+1+2", "-2+3", "@SUM(A1)", "\tcmd", "\r=1"])
def test_csv_cells_that_a_spreadsheet_would_run_are_neutralised(tmp_path, text):
    path = write_csv([{"module": text, "people": 12, "signal_dbm": -71.0}], tmp_path / "r.csv")
    with path.open(newline="") as f:
        [row] = list(csv.DictReader(f))
    assert row == {"module": "'" + text, "people": "12", "signal_dbm": "-71.0"}  # numbers stay numbers
