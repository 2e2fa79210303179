"""The telehealth store: a limited data set — no identifier of the registry, no time of day, no free text — that
opens only with its own key; keys are stable, rebuilds atomic, rotation loses nothing.

A registry full of identifiers (names, MRNs, dates of birth, serials, device and app ids, appointment and
message ids) is published, with app events and device status carrying free text (a spreadsheet formula with a
name and a diagnosis in an education module, a name in a survey, an SSN shaped like a firmware version); then
every column of every table and view of the store is checked: its type, every value against every identifier,
and every catalogued field against the catalogue.
"""

from __future__ import annotations

import itertools
import json
import os
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import duckdb
import pytest

from core import keys
from core.keys import write_private
from core.settings import Settings
from transforms import catalogue
from warehouse.db import clinical, httpfs_extension
from warehouse.registry import enroll, upsert_patient
from warehouse.serving import publish_snapshot
from warehouse.telehealth import (
    TABLES,
    TelehealthLocked,
    _build,
    open_telehealth,
    pseudonym,
    pseudonym_key,
    publish_telehealth,
    rotate_key,
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
RUN_ID = "scheduled__2026-11-27T10:00:00"  # an instant: stays in the ops records
# Free text an app or a device may send where the contract expects a catalogued value.
HOSTILE_MODULE = '=HYPERLINK("http://x","Jane Roe DOB 1950-01-01 HIV+")'
HOSTILE_SURVEY = "Jane Roe phq-9 answers"
HOSTILE_FIRMWARE = "123.45.6789"  # digits and dots, shaped like a version number: an SSN
HOSTILE_TEXT = ["HYPERLINK", "Jane Roe", "1950-01-01", "HIV", "phq-9 answers", HOSTILE_FIRMWARE, "model-x"]

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
        add_event(con, "pt-9x2m-bravo", "app-whisky-0004", "education_viewed", NOW - timedelta(days=2),
                  "msg-india-e004", module=HOSTILE_MODULE, minutes=1.0)
        add_event(con, "pt-9x2m-bravo", "app-whisky-0004", "survey_completed", NOW - timedelta(days=2, hours=1),
                  "msg-india-e005", survey=HOSTILE_SURVEY)
        for device_id, (owner, kind, _) in DEVICES.items():
            if kind != "app":
                add_event(con, owner, device_id, "device_status", NOW - timedelta(hours=6),
                          f"msg-juliet-{device_id}", battery_pct=64.0, signal_dbm=-71.0,
                          firmware="2.4.1" if kind == "bp" else HOSTILE_FIRMWARE, uptime_s=86400.0)
        # A quarantined item names its device and carries the raw payload; only the rule and day may travel.
        con.execute("""INSERT INTO quarantine (row_key, segment, record_no, item_no, device_id, reasons, detail, raw,
                                               received_at, quarantined_at)
                       VALUES ('seg-q:0:0', 'seg-q', 0, 0, 'cuff-zulu-0001', ['unknown_unit'],
                               'cuff-zulu-0001 sent MRN-55501-Q', ?, ?, ?)""",
                    [b'{"msg_id": "msg-kilo-q001", "patient": "Zebediah"}', NOW, NOW])
        con.execute("""INSERT INTO pipeline_runs (run_id, state, started_at, finished_at, segments, messages,
                                                  received, loaded, quarantined, duplicates)
                       VALUES (?, 'success', ?, ?, 3, 40, 40, 38, 1, 1)""",
                    [RUN_ID, NOW - timedelta(minutes=3), NOW - timedelta(minutes=2)])
    publish_snapshot(s)
    publish_telehealth(s)


def identifiers() -> list[str]:
    ids = [BROKER_INGEST_USER, *APPOINTMENTS, RUN_ID]
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


def column_types(con: duckdb.DuckDBPyConnection) -> dict[tuple[str, str], str]:
    """(relation, column) -> data type, for every column of every table and view."""
    return {(t, c): d for t, c, d in con.execute("""SELECT table_name, column_name, data_type
                                                    FROM information_schema.columns
                                                    WHERE table_catalog = current_database()""").fetchall()}


# Catalogued columns wherever they appear (tables and views), and the values each may hold besides the
# catalogue's: a total row's label, and 'unknown' for an appointment whose modality was never given.
def allowed(column: str, value: object, extra: str = "") -> bool:
    if value is None or value == catalogue.OTHER:
        return True
    if column == "firmware":
        return value == "all" or any(value in versions for versions in catalogue.FIRMWARE.values())
    if column == "programmes":
        return set(value) <= set(catalogue.PROGRAMMES)  # type: ignore[call-overload]
    return value in catalogue.listed(extra)[column] or column == "modality" and value in ("all", "unknown")


CATALOGUED = ("module", "survey", "modality", "firmware", "programmes")


def outside_catalogue(con: duckdb.DuckDBPyConnection, extra: str = "") -> list[tuple[str, str, object]]:
    """(relation, column, value) for every value of a catalogued column that the catalogue does not allow."""
    found = []
    for (name, column), _ in column_types(con).items():
        if column in CATALOGUED:
            found += [(name, column, v) for (v,) in con.execute(f'SELECT DISTINCT "{column}" FROM "{name}"').fetchall()
                      if not allowed(column, v, extra)]
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
        assert con.execute("SELECT outcome, modality FROM appointments").fetchall() == [("attended", "video")] * 2
        assert con.execute("SELECT count(*) FROM device_status").fetchone()[0] == 2
        assert con.execute("SELECT reason, items FROM quarantine_daily").fetchall() == [("unknown_unit", 1)]
        assert con.execute("SELECT runs, loaded FROM pipeline_daily").fetchall() == [(1, 38)]
        assert con.execute("SELECT hipaa_route FROM store_info").fetchone()[0].startswith("limited data set")
    finally:
        con.close()
    assert set(TABLES) <= {n for n, k in kinds.items() if k == "BASE TABLE"}
    assert {"mart_education_weekly", "mart_appointments_by_modality", "mart_appointments_weekly",
            "mart_device_connectivity", "mart_connectivity_by_kind", "mart_firmware_spread", "mart_adherence",
            "mart_pipeline_daily"} <= {n for n, k in kinds.items() if k == "VIEW"}


def test_no_column_holds_a_time_of_day(store):
    """Dates only, as coarse as each report needs: no TIME or TIMESTAMP column in any table or view."""
    con = open_telehealth(store)
    try:
        types = column_types(con)
        assert len(types) > 60
        assert {k: t for k, t in types.items() if "TIME" in t.upper()} == {}
        # Dates are weeks, days or months; enrolment is a month.
        assert con.execute("SELECT DISTINCT day(enrolled_month) FROM people WHERE enrolled_month IS NOT NULL"
                           ).fetchall() == [(1,)]
        assert {isodow for (isodow,) in con.execute("SELECT DISTINCT isodow(week) FROM education_events "
                                                   "UNION SELECT isodow(week) FROM appointments").fetchall()} == {1}
    finally:
        con.close()


def test_conditions_are_care_programmes(store):
    key = pseudonym(pseudonym_key(store), "patient", "pt-9x2m-bravo")
    con = open_telehealth(store)
    try:
        programmes = dict(con.execute("SELECT person_key, programmes FROM people").fetchall())
    finally:
        con.close()
    assert programmes[key] == ["diabetes", "heart_failure"]
    assert sorted(map(tuple, programmes.values())) == [(), ("diabetes", "heart_failure"), ("hypertension",)]


def test_free_text_outside_the_catalogue_is_stored_as_other(store):
    con = open_telehealth(store)
    try:
        assert outside_catalogue(con) == []
        modules = sorted(r[0] for r in con.execute("SELECT module FROM education_events").fetchall())
        assert modules == ["other", "salt-and-blood-pressure", "salt-and-blood-pressure"]
        assert sorted(r[0] for r in con.execute("SELECT survey FROM survey_events").fetchall()) == ["other", "phq-2"]
        assert sorted(r[0] for r in con.execute("SELECT firmware FROM device_status").fetchall()) == ["2.4.1",
                                                                                                      "other"]
        assert leaks(con, HOSTILE_TEXT) == []
    finally:
        con.close()
    # The raw values stay in the clinical stream, where the practice can see what was sent.
    with clinical(store, read_only=True) as con:
        sent = {v for row in con.execute("SELECT module, survey, firmware FROM telehealth_events").fetchall()
                for v in row}
    assert {HOSTILE_MODULE, HOSTILE_SURVEY, HOSTILE_FIRMWARE} <= sent


def test_a_practice_extends_the_catalogue_with_a_setting(tmp_path):
    s = Settings(home=tmp_path / "var", telehealth_catalogue_extra="module:heart-healthy-eating,survey:ipaq")
    with clinical(s) as con:
        upsert_patient(con, "pt-1")
        enroll(con, "app-1", "pt-1", kind="app", valid_from=NOW - timedelta(days=3))
        add_event(con, "pt-1", "app-1", "education_viewed", NOW - timedelta(days=1), "m-1",
                  module="heart-healthy-eating", minutes=3.0)
        add_event(con, "pt-1", "app-1", "survey_completed", NOW - timedelta(days=1), "m-2", survey="ipaq")
        add_event(con, "pt-1", "app-1", "survey_completed", NOW - timedelta(days=2), "m-3", survey="gad-77")
    publish_snapshot(s)
    publish_telehealth(s)
    con = open_telehealth(s)
    try:
        assert con.execute("SELECT module FROM education_events").fetchall() == [("heart-healthy-eating",)]
        assert sorted(con.execute("SELECT survey FROM survey_events").fetchall()) == [("ipaq",), ("other",)]
        assert outside_catalogue(con, s.telehealth_catalogue_extra) == []
    finally:
        con.close()


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
    assert sorted(p.name for p in telehealth_db(store).parent.glob("*telehealth.duckdb*")) == ["telehealth.duckdb"]


def test_registry_identifiers_are_in_the_clinical_warehouse(store):
    """The scan is meaningful: every identifier searched for does exist upstream."""
    with clinical(store, read_only=True) as con:
        text = " ".join(str(v) for t in ("patients", "devices", "telehealth_events", "readings", "pipeline_runs")
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
                "appointment": {r[0] for r in con.execute("SELECT appointment_key FROM appointments").fetchall()}}
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
    for kind, pseudonyms in first.items():
        assert len(second[kind]) == len(pseudonyms)
        assert second[kind].isdisjoint(pseudonyms), kind


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
    assert not list(Path(s.warehouse_dir).glob(".telehealth.duckdb*"))  # type: ignore[arg-type]


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


# --- encryption at rest ---------------------------------------------------------------------------------------


def attach(path: Path, key: str | None) -> None:
    """ATTACH the store as any DuckDB user would, with ``key`` or none."""
    con = duckdb.connect()
    try:
        con.execute(f"LOAD '{httpfs_extension()}'")
        option = f", ENCRYPTION_KEY '{key}'" if key else ""
        con.execute(f"ATTACH '{path}' AS th (READ_ONLY{option})")
        con.execute("SELECT count(*) FROM th.people").fetchone()
    finally:
        con.close()


def test_the_store_opens_only_with_its_own_key(store):
    path = telehealth_db(store)
    with pytest.raises(duckdb.Error, match="encrypted"):
        duckdb.connect(str(path), read_only=True)
    with pytest.raises(duckdb.Error, match="without a key"):
        attach(path, None)
    with pytest.raises(duckdb.Error, match="[Ww]rong encryption key"):
        attach(path, keys.warehouse_key(store))  # the clinical key is not the store's
    attach(path, keys.telehealth_key(store))
    key_file = keys.telehealth_key_file(store)
    st = key_file.stat()
    assert (st.st_mode & 0o777, st.st_uid) == (0o600, os.geteuid())
    assert key_file.parent == Path(store.secrets_dir) and path.stat().st_mode & 0o777 == 0o600


def test_without_its_key_the_store_is_refused_with_one_clear_message(tmp_path):
    s = Settings(home=tmp_path / "var")
    with clinical(s) as con:
        upsert_patient(con, "pt-1")
    publish_snapshot(s)
    publish_telehealth(s)
    keys.telehealth_key_file(s).unlink()
    with pytest.raises(TelehealthLocked, match="does not open with .*telehealth.key.*rpm pipeline run"):
        open_telehealth(s)
    publish_telehealth(s)  # the next run rebuilds it under a new key
    open_telehealth(s).close()


def test_rotation_rebuilds_the_store_under_a_new_key_and_keeps_pseudonyms(store):
    before, old_key = keys_of(store), keys.telehealth_key(store)
    result = rotate_key(store)
    new_key = keys.telehealth_key(store)
    assert new_key != old_key and result["tables"] == len(TABLES) and result["rows"] > 0
    with pytest.raises(duckdb.Error, match="[Ww]rong encryption key"):
        attach(telehealth_db(store), old_key)
    assert keys_of(store) == before
    assert not keys.telehealth_key_file_next(store).exists()


def test_a_rotation_that_died_after_its_swap_is_finished_by_the_next_rebuild(tmp_path):
    """Killed between swapping the rebuilt store in and promoting its key: readers open the store with the
    staged key meanwhile, and the next rebuild promotes it."""
    s = Settings(home=tmp_path / "var")
    with clinical(s) as con:
        upsert_patient(con, "pt-1")
    publish_snapshot(s)
    publish_telehealth(s)
    old_key = keys.telehealth_key(s)
    staged = keys.telehealth_key_file_next(s)
    write_private(staged, bytes(range(32)).hex().encode())
    _build(s, keys.read_secret(staged))  # the rotation's rebuild, then the kill
    assert people(s) == 1  # opened with the staged key
    publish_telehealth(s)
    assert not staged.exists() and keys.telehealth_key(s) == bytes(range(32)).hex() != old_key
    attach(telehealth_db(s), keys.telehealth_key(s))
    assert people(s) == 1


def people(s: Settings) -> int:
    con = open_telehealth(s)
    try:
        return con.execute("SELECT count(*) FROM people").fetchone()[0]  # type: ignore[index]
    finally:
        con.close()
