"""The telehealth store: no direct identifier of the registry reaches it, keys are stable, rebuilds are atomic.

A registry full of identifiers (names, MRNs, dates of birth, serials, device and app ids, appointment and
message ids) is published; then every value of every table and view of the store, and the raw bytes of its
file, are searched for each of them.
"""

from __future__ import annotations

import itertools
import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import duckdb
import pytest

from core.keys import write_private
from core.settings import Settings
from warehouse.db import clinical
from warehouse.registry import enroll, upsert_patient
from warehouse.serving import publish_snapshot
from warehouse.telehealth import (
    TABLES,
    open_telehealth,
    pseudonym,
    pseudonym_key,
    publish_telehealth,
    telehealth_db,
)

NOW = datetime.now(UTC).replace(microsecond=0)
BROKER_INGEST_USER = "rpm-ingest"

# Distinctive values: none can occur by chance inside a hex pseudonym, a number or a 2026 date.
PATIENTS = [
    dict(patient_id="pt-7f3k-alpha", mrn="MRN-55501-Q", given_name="Zebediah", family_name="Quackenbush",
         birth_date=date(1948, 2, 29), time_zone="America/New_York", conditions=["hypertension"]),
    dict(patient_id="pt-9x2m-bravo", mrn="MRN-55502-Q", given_name="Philippa", family_name="Ravenscroft-Ngata",
         birth_date=date(1961, 7, 4), time_zone="Europe/Berlin", conditions=["heart_failure", "diabetes"]),
    # On the registry, never enrolled: still must not leak.
    dict(patient_id="pt-4c8n-charlie", mrn="MRN-55503-Q", given_name="Octavius", family_name="Wolstenholme",
         birth_date=date(1939, 11, 11), time_zone="UTC", conditions=None),
]
# device id -> (owner, kind, serial); apps publish the patient's app events and are bound like devices.
DEVICES = {
    "cuff-zulu-0001": ("pt-7f3k-alpha", "bp", "SN-ZX81-00A7"),
    "scale-yankee-0002": ("pt-9x2m-bravo", "scale", "SN-QQ42-77B1"),
    "app-xray-0003": ("pt-7f3k-alpha", "app", "SN-APPX-0003"),
    "app-whisky-0004": ("pt-9x2m-bravo", "app", "SN-APPW-0004"),
}
APPOINTMENTS = {"apt-kilo-9001": "app-xray-0003", "apt-lima-9002": "app-whisky-0004"}

_n = itertools.count()


def add_reading(con: duckdb.DuckDBPyConnection, patient_id: str, device_id: str, measured_at: datetime,
                msg_id: str) -> None:
    n = next(_n)
    con.execute("""
        INSERT INTO readings (reading_id, patient_id, device_id, metric, loinc, value, unit, unit_sent,
                              measured_at, utc_offset_min, received_at, loaded_at, msg_id, segment, record_no,
                              item_no)
        VALUES (?, ?, ?, 'heart_rate', '8867-4', 72, '/min', '/min', ?, -300, ?, ?, ?, 'seg-r', ?, 0)""",
        [f"rd-{n:06d}", patient_id, device_id, measured_at, measured_at, measured_at, msg_id, n])


def add_event(con: duckdb.DuckDBPyConnection, patient_id: str, device_id: str, event: str, occurred_at: datetime,
              msg_id: str, **fields: Any) -> None:
    """Insert one telehealth event as the loader would (every NOT NULL column filled)."""
    n = next(_n)
    row = {"event_id": f"ev-{n:06d}", "patient_id": patient_id, "device_id": device_id,
           "channel": "status" if event == "device_status" else "events", "event": event,
           "occurred_at": occurred_at, "utc_offset_min": -300, "received_at": occurred_at,
           "loaded_at": occurred_at, "msg_id": msg_id, "segment": "seg-e", "record_no": n, "item_no": 0, **fields}
    con.execute(f"INSERT INTO telehealth_events ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                list(row.values()))


def build_registry(s: Settings) -> None:
    """Registry, readings, every kind of telehealth event and a pipeline run; then publish both stores."""
    with clinical(s) as con:
        for p in PATIENTS:
            upsert_patient(con, **p)
        for device_id, (owner, kind, serial) in DEVICES.items():
            enroll(con, device_id, owner, kind=kind, valid_from=NOW - timedelta(days=40))
            con.execute("UPDATE devices SET serial = ?, model = 'model-x' WHERE device_id = ?", [serial, device_id])
        for i, day in enumerate((35, 20, 19, 3)):
            add_reading(con, "pt-7f3k-alpha", "cuff-zulu-0001", NOW - timedelta(days=day), f"msg-golf-r{i:03d}")
            add_reading(con, "pt-9x2m-bravo", "scale-yankee-0002", NOW - timedelta(days=day, hours=5),
                        f"msg-hotel-r{i:03d}")
        # Identifiers smuggled into a free-form field of the contract (``extra``) must not travel either.
        extra = json.dumps({"note": "Zebediah Quackenbush MRN-55501-Q"})
        add_event(con, "pt-7f3k-alpha", "app-xray-0003", "education_viewed", NOW - timedelta(days=6),
                  "msg-golf-e001", module="salt-and-blood-pressure", minutes=5.0, extra=extra)
        add_event(con, "pt-7f3k-alpha", "app-xray-0003", "education_completed", NOW - timedelta(days=5),
                  "msg-golf-e002", module="salt-and-blood-pressure", minutes=9.0)
        for appointment, app in APPOINTMENTS.items():
            owner = DEVICES[app][0]
            add_event(con, owner, app, "appointment_scheduled", NOW - timedelta(days=4), f"msg-{appointment}-s",
                      appointment_id=appointment, modality="video", scheduled_for=NOW - timedelta(days=1))
            add_event(con, owner, app, "appointment_attended", NOW - timedelta(days=1), f"msg-{appointment}-a",
                      appointment_id=appointment, modality="video")
        add_event(con, "pt-9x2m-bravo", "app-whisky-0004", "survey_completed", NOW - timedelta(days=2),
                  "msg-india-e003", survey="phq-2")
        for device_id, (owner, kind, _) in DEVICES.items():
            if kind != "app":
                add_event(con, owner, device_id, "device_status", NOW - timedelta(hours=6),
                          f"msg-juliet-{device_id}", battery_pct=64.0, signal_dbm=-71.0, firmware="2.4.1",
                          uptime_s=86400.0)
        # A quarantined item names its device and carries the raw payload; only the rule and day may travel.
        con.execute("""INSERT INTO quarantine (row_key, segment, record_no, item_no, device_id, reasons, detail, raw,
                                               received_at, quarantined_at)
                       VALUES ('seg-q:0:0', 'seg-q', 0, 0, 'cuff-zulu-0001', ['unknown_unit'],
                               'cuff-zulu-0001 sent MRN-55501-Q', ?, ?, ?)""",
                    [b'{"msg_id": "msg-kilo-q001", "patient": "Zebediah"}', NOW, NOW])
        con.execute("""INSERT INTO pipeline_runs (run_id, state, started_at, finished_at, segments, messages,
                                                  received, loaded, quarantined, duplicates)
                       VALUES ('scheduled__2026-11-27T10:00:00', 'success', ?, ?, 3, 40, 40, 38, 1, 1)""",
                    [NOW - timedelta(minutes=3), NOW - timedelta(minutes=2)])
    publish_snapshot(s)
    publish_telehealth(s)


def identifiers() -> list[str]:
    ids = [BROKER_INGEST_USER, *APPOINTMENTS]
    for p in PATIENTS:
        ids += [p["patient_id"], p["mrn"], p["given_name"], p["family_name"], p["birth_date"].isoformat()]
    for device_id, (_, _, serial) in DEVICES.items():
        ids += [device_id, serial]  # a device id is also its broker username
    return ids


def msg_ids(s: Settings) -> list[str]:
    with clinical(s, read_only=True) as con:
        return [r[0] for r in con.execute("SELECT msg_id FROM readings UNION SELECT msg_id FROM telehealth_events")
                                      .fetchall()]


def relations(con: duckdb.DuckDBPyConnection) -> dict[str, str]:
    """Every table and view of the store: name -> BASE TABLE | VIEW."""
    return dict(con.execute("""SELECT table_name, table_type FROM information_schema.tables
                               WHERE table_catalog = current_database()""").fetchall())


def leaks(con: duckdb.DuckDBPyConnection, needles: list[str]) -> list[tuple[str, str, str]]:
    """(relation, column, identifier) for every identifier found in any value cast to text."""
    lowered = [n.lower() for n in needles]
    found = []
    for name in relations(con):
        cur = con.execute(f'SELECT CAST(COLUMNS(*) AS VARCHAR) FROM "{name}"')
        columns = [d[0] for d in cur.description]
        for row in cur.fetchall():
            for column, value in zip(columns, row, strict=True):
                text = (value or "").lower()
                found += [(name, column, n) for n, low in zip(needles, lowered, strict=True) if low in text]
    views = con.execute("SELECT view_name, sql FROM duckdb_views() WHERE NOT internal").fetchall()
    found += [(v, "<definition>", n) for v, sql in views for n in needles if n.lower() in sql.lower()]
    return found


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    s = Settings(home=tmp_path_factory.mktemp("th") / "var")
    build_registry(s)
    return s


def test_store_has_every_table_and_the_report_views(store):
    con = open_telehealth(store)
    try:
        kinds = relations(con)
        assert con.execute("SELECT count(*) FROM appointment_events").fetchone()[0] == 4
        assert con.execute("SELECT count(*) FROM device_status").fetchone()[0] == 2
        assert con.execute("SELECT reason, items FROM quarantine_daily").fetchall() == [("unknown_unit", 1)]
    finally:
        con.close()
    assert set(TABLES) <= {n for n, k in kinds.items() if k == "BASE TABLE"}
    assert {"mart_education_weekly", "mart_appointments_by_modality", "mart_appointments_weekly",
            "mart_device_connectivity", "mart_firmware_spread", "mart_adherence",
            "mart_pipeline_health"} <= {n for n, k in kinds.items() if k == "VIEW"}


def test_device_days_are_days_of_the_registered_home_zone(store):
    """The scale's readings are stamped at UTC-5, its owner lives in Berlin: the days are Berlin's."""
    key = pseudonym(pseudonym_key(store), "patient", "pt-9x2m-bravo")
    con = open_telehealth(store)
    try:
        days = {d for (d,) in con.execute("SELECT day FROM device_days WHERE person_key = ?", [key]).fetchall()}
    finally:
        con.close()
    assert days == {(NOW - timedelta(days=d, hours=5)).astimezone(ZoneInfo("Europe/Berlin")).date()
                    for d in (35, 20, 19, 3)}


def test_no_identifier_in_any_value_of_any_table_or_view(store):
    needles = identifiers() + msg_ids(store)
    assert len(needles) > 30
    con = open_telehealth(store)
    try:
        assert leaks(con, needles) == []
        # The scan can see: the same search finds what the store does hold.
        key = pseudonym(pseudonym_key(store), "patient", "pt-7f3k-alpha")
        assert leaks(con, [key]) and leaks(con, ["salt-and-blood-pressure"])
    finally:
        con.close()


def test_no_identifier_in_the_raw_bytes_of_the_file(store):
    raw = telehealth_db(store).read_bytes()
    for needle in identifiers() + msg_ids(store):
        assert needle.encode() not in raw, needle
    # Nothing but the store itself is left next to it (no half-built file, no write-ahead log).
    assert sorted(p.name for p in telehealth_db(store).parent.glob("*telehealth*")) == ["telehealth.duckdb"]


def test_registry_identifiers_are_in_the_clinical_warehouse(store):
    """The scan is meaningful: every identifier searched for does exist upstream."""
    with clinical(store, read_only=True) as con:
        text = " ".join(str(v) for t in ("patients", "devices", "telehealth_events", "readings")
                        for row in con.execute(f"SELECT * FROM {t}").fetchall() for v in row)
    missing = [n for n in identifiers() if n not in text and n != BROKER_INGEST_USER]
    assert missing == []


def test_failed_run_error_text_does_not_reach_the_store(tmp_path):
    from warehouse.ops import record_failure

    s = Settings(home=tmp_path / "var")
    with clinical(s) as con:
        upsert_patient(con, "pt-7f3k-alpha")
        enroll(con, "cuff-zulu-0001", "pt-7f3k-alpha", kind="bp")
        record_failure(con, "manual__1", "load",
                       "ConstraintException: Duplicate key \"patient_id: pt-7f3k-alpha, device_id: cuff-zulu-0001\"")
    publish_snapshot(s)
    publish_telehealth(s)
    con = open_telehealth(s)
    try:
        assert leaks(con, ["pt-7f3k-alpha", "cuff-zulu-0001"]) == []
    finally:
        con.close()


def keys_of(s: Settings) -> dict[str, set[str]]:
    con = open_telehealth(s)
    try:
        return {"person": {r[0] for r in con.execute("SELECT person_key FROM people").fetchall()},
                "device": {r[0] for r in con.execute("SELECT device_key FROM devices").fetchall()},
                "appointment": {r[0] for r in con.execute("SELECT appointment_key FROM appointment_events").fetchall()},
                "event": {r[0] for r in con.execute("SELECT event_key FROM appointment_events").fetchall()}}
    finally:
        con.close()


def test_pseudonyms_are_stable_across_rebuilds_and_depend_on_the_key(store, tmp_path):
    first = keys_of(store)
    publish_telehealth(store)
    assert keys_of(store) == first
    key = pseudonym_key(store)
    assert first["person"] == {pseudonym(key, "patient", p["patient_id"]) for p in PATIENTS}
    assert first["device"] == {pseudonym(key, "device", d) for d in DEVICES}
    # Appointments are keyed per patient (a re-installed app keeps the appointment's pseudonym).
    assert first["appointment"] == {pseudonym(key, "appointment", f"{DEVICES[app][0]}|{apt}")
                                    for apt, app in APPOINTMENTS.items()}

    other = Settings(home=tmp_path / "other")
    write_private(Path(other.secrets_dir) / "pseudonym.key", bytes(range(32)).hex().encode())  # type: ignore[arg-type]
    build_registry(other)
    assert pseudonym_key(other) != key
    second = keys_of(other)
    for kind, keys in first.items():
        assert len(second[kind]) == len(keys)
        assert second[kind].isdisjoint(keys), kind


def test_rebuild_swaps_the_store_atomically(tmp_path):
    s = Settings(home=tmp_path / "var")
    with clinical(s) as con:
        upsert_patient(con, "pt-old")
        enroll(con, "cuff-old", "pt-old", kind="bp")
    publish_snapshot(s)
    publish_telehealth(s)
    before = open_telehealth(s)
    try:
        with clinical(s) as con:
            upsert_patient(con, "pt-new")
            enroll(con, "cuff-new", "pt-new", kind="bp")
        publish_snapshot(s)
        counts = publish_telehealth(s)
        assert counts["people"] == 2
        # A reader that opened the store before the rebuild keeps reading the store it opened, whole.
        assert before.execute("SELECT count(*) FROM people").fetchone()[0] == 1
        assert before.execute("SELECT enrolled_people FROM mart_adherence").fetchone()[0] == 1
    finally:
        before.close()
    after = open_telehealth(s)
    try:
        assert after.execute("SELECT count(*) FROM people").fetchone()[0] == 2
        assert after.execute("SELECT enrolled_people FROM mart_adherence").fetchone()[0] == 2
    finally:
        after.close()
    assert not list(Path(s.warehouse_dir).glob(".telehealth*"))  # type: ignore[arg-type]


def test_a_reader_opened_after_a_rebuild_sees_it_while_an_older_reader_is_open(tmp_path):
    s = Settings(home=tmp_path / "var")
    with clinical(s) as con:
        upsert_patient(con, "pt-old")
    publish_snapshot(s)
    publish_telehealth(s)
    before = open_telehealth(s)
    try:
        with clinical(s) as con:
            upsert_patient(con, "pt-new")
        publish_snapshot(s)
        publish_telehealth(s)
        after = open_telehealth(s)
        try:
            assert after.execute("SELECT count(*) FROM people").fetchone()[0] == 2
        finally:
            after.close()
    finally:
        before.close()
