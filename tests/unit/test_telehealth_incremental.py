"""The telehealth store updated run by run holds exactly what a full rebuild of the same warehouse holds.

A pipeline run updates the store with what it loaded (warehouse/telehealth.py) instead of rebuilding it from
every reading. Each batch below is loaded into one warehouse whose store is only ever updated; a copy of the
whole RPM_HOME then rebuilds its store from scratch, and every table must match row for row. The batches
cover what moves each table: new readings (one late, splitting an old silence; one typed by hand), a device
going quiet, education, surveys, an appointment whose outcome changes, device status, quarantine, runs — and
around them a key rotation, a landing purge, and readings deleted under the store (which only a rebuild can
follow).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest

from core import keys
from core.settings import Settings
from warehouse.db import clinical
from warehouse.registry import enroll, upsert_patient
from warehouse.retention import purge_landing
from warehouse.serving import publish_snapshot, serving
from warehouse.telehealth import TABLES, open_telehealth, publish_telehealth, rotate_key

# Whole hours before the test starts: a silence's length is stored in whole hours measured to the build, and a
# test shorter than half an hour rounds the same in both builds.
NOW = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
PATIENTS = {"pt-a": "America/New_York", "pt-b": "Europe/Berlin", "pt-c": None}
DEVICES = {"cuff-a": ("pt-a", "bp"), "scale-b": ("pt-b", "scale"), "ox-c": ("pt-c", "ox"),
           "app-a": ("pt-a", "app"), "app-b": ("pt-b", "app")}
_n = itertools.count()


def reading(con: duckdb.DuckDBPyConnection, device_id: str, hours_ago: float, manual: bool = False) -> None:
    """One reading as the loader writes it: loaded now (the load instant orders what each update absorbs)."""
    n = next(_n)
    patient = DEVICES[device_id][0]
    con.execute("""
        INSERT INTO readings (reading_id, patient_id, device_id, metric, loinc, value, unit, unit_sent,
                              measured_at, utc_offset_min, received_at, loaded_at, msg_id, segment, record_no,
                              item_no, manual)
        VALUES (?, ?, ?, 'heart_rate', '8867-4', 70, '/min', '/min', ?, -300, ?, now(), ?, 'seg', ?, 0, ?)""",
                [f"rd-{n:06d}", patient, device_id, NOW - timedelta(hours=hours_ago), NOW, f"m{n}", n, manual])


def event(con: duckdb.DuckDBPyConnection, device_id: str, name: str, hours_ago: float, **fields: object) -> None:
    n = next(_n)
    row = {"event_id": f"ev-{n:06d}", "patient_id": DEVICES[device_id][0], "device_id": device_id,
           "channel": "status" if name == "device_status" else "events", "event": name,
           "occurred_at": NOW - timedelta(hours=hours_ago), "utc_offset_min": -300, "received_at": NOW,
           "msg_id": f"m{n}", "segment": "seg", "record_no": n, "item_no": 0, **fields}
    con.execute(f"INSERT INTO telehealth_events ({', '.join(row)}, loaded_at) "
                f"VALUES ({', '.join('?' * len(row))}, now())", list(row.values()))


def run_record(con: duckdb.DuckDBPyConnection, quarantined: int) -> None:
    n = next(_n)
    con.execute("""INSERT INTO pipeline_runs (run_id, state, started_at, finished_at, received, loaded,
                                              quarantined, duplicates)
                   VALUES (?, 'success', now(), now(), 10, ?, ?, 0)""", [f"run-{n}", 10 - quarantined, quarantined])
    for i in range(quarantined):
        con.execute("""INSERT INTO quarantine (row_key, segment, record_no, item_no, reasons, raw, received_at,
                                               quarantined_at)
                       VALUES (?, 'seg', ?, 0, ['value_in_range'], 'x', now(), now())""", [f"q{n}:{i}", n])


def snapshot_of_store(s: Settings) -> dict[str, list[tuple]]:
    """Every row of every table of the store, in a stable order."""
    con = open_telehealth(s)
    try:
        return {name: sorted(con.execute(f"SELECT * FROM {name}").fetchall(), key=repr) for name in TABLES}
    finally:
        con.close()


def built_by(s: Settings) -> str:
    return json.loads((Path(s.warehouse_dir) / ".telehealth-state.json").read_text())["built_by"]


def rebuilt_copy(s: Settings, where: Path) -> Settings:
    """The same RPM_HOME copied aside, its store rebuilt from scratch."""
    shutil.rmtree(where, ignore_errors=True)
    shutil.copytree(s.home, where)
    copy = Settings(home=where)
    publish_telehealth(copy, full=True)
    return copy


def publish(s: Settings) -> None:
    publish_snapshot(s)
    publish_telehealth(s)


def assert_same_as_rebuild(s: Settings, tmp_path: Path) -> None:
    updated = snapshot_of_store(s)
    assert any(updated.values())
    assert updated == snapshot_of_store(rebuilt_copy(s, tmp_path / "rebuilt"))


@pytest.fixture
def home(tmp_path: Path) -> Settings:
    s = Settings(home=tmp_path / "var")
    with clinical(s) as con:
        for patient, zone in PATIENTS.items():
            upsert_patient(con, patient, time_zone=zone, conditions=["hypertension"])
        for device, (patient, kind) in DEVICES.items():
            enroll(con, device, patient, kind=kind, valid_from=NOW - timedelta(days=60))
        for hours in (24 * 50, 24 * 40, 24 * 39, 24 * 10):
            reading(con, "cuff-a", hours)
            reading(con, "scale-b", hours + 3)
        reading(con, "ox-c", 24 * 30)
        event(con, "app-a", "appointment_scheduled", 24 * 5, appointment_id="apt-1", modality="video")
        run_record(con, 1)
    publish(s)
    assert built_by(s) == "rebuild"
    return s


def test_updates_over_several_batches_match_a_full_rebuild(home: Settings, tmp_path: Path):
    s = home
    batches = [
        # New readings today; a late one inside the 10-day silence of the cuff; a hand-typed one.
        # The scale's last transmission 30 h ago: a silence just over a day, which the later runs remeasure.
        lambda con: [reading(con, "cuff-a", 2), reading(con, "cuff-a", 24 * 25), reading(con, "scale-b", 5, True),
                     reading(con, "scale-b", 30)],
        # Education, a survey, the appointment attended, device status, a run with quarantine.
        lambda con: [event(con, "app-a", "education_viewed", 30, module="salt-and-blood-pressure", minutes=4.0),
                     event(con, "app-a", "education_completed", 29, module="salt-and-blood-pressure", minutes=6.0),
                     event(con, "app-b", "survey_completed", 20, survey="phq-2"),
                     event(con, "app-a", "appointment_attended", 24, appointment_id="apt-1", modality="phone"),
                     event(con, "cuff-a", "device_status", 3, battery_pct=15.0, signal_dbm=-80.0, firmware="2.4.1"),
                     run_record(con, 2)],
        # Both streams at once, for different people: a reading of one patient, events of another — one of
        # them the status of a device whose readings stopped days ago (its silence is read, not rebuilt).
        lambda con: [reading(con, "ox-c", 0.5),
                     event(con, "scale-b", "device_status", 2, battery_pct=40.0, signal_dbm=-70.0),
                     event(con, "app-b", "education_viewed", 1, module="salt-and-blood-pressure", minutes=2.0),
                     event(con, "cuff-a", "device_status", 1, battery_pct=12.0),  # that day's row changes
                     run_record(con, 1)],
        # Only another patient's reading: the others' rows stay as they were.
        lambda con: [reading(con, "ox-c", 1), run_record(con, 0)],
    ]
    for load in batches:
        with clinical(s) as con:
            load(con)
        publish(s)
        assert built_by(s) == "update"
        assert_same_as_rebuild(s, tmp_path)
        state = state_path(s).read_text()  # beside the store, outside its key: counts and instants only
        assert not any(i in state for i in [*PATIENTS, *DEVICES, "apt-1"])


def test_a_run_with_nothing_new_keeps_the_store_and_the_current_silences(home: Settings, tmp_path: Path):
    publish(home)
    assert built_by(home) == "update"
    gaps = snapshot_of_store(home)["device_gaps"]
    assert any(row[-1] for row in gaps)  # ox-c has been silent for 30 days: an ongoing silence
    assert_same_as_rebuild(home, tmp_path)


def test_key_rotation_and_landing_purge_then_updates_continue(home: Settings, tmp_path: Path):
    s = home
    old_key = keys.telehealth_key(s)
    rotate_key(s)
    assert keys.telehealth_key(s) != old_key and built_by(s) == "rebuild"
    with clinical(s) as con:
        reading(con, "cuff-a", 1)
    publish(s)
    assert built_by(s) == "update"  # under the new key
    assert_same_as_rebuild(s, tmp_path)
    purge_landing(s, older_than_days=0)
    with clinical(s) as con:
        reading(con, "scale-b", 1)
    publish(s)
    assert built_by(s) == "update"
    assert_same_as_rebuild(s, tmp_path)


def test_readings_deleted_under_the_store_make_the_next_run_rebuild_it(home: Settings, tmp_path: Path):
    """A retention of readings (or a repair) removes rows an update cannot see go: the count up to the last
    build's load instant moved, so the store is rebuilt."""
    with clinical(home) as con:
        con.execute("DELETE FROM readings WHERE measured_at < ?", [NOW - timedelta(days=45)])
        reading(con, "cuff-a", 1)
    publish(home)
    assert built_by(home) == "rebuild"
    assert_same_as_rebuild(home, tmp_path)


def test_a_registry_change_rebuilds_the_store(home: Settings, tmp_path: Path):
    with clinical(home) as con:
        upsert_patient(con, "pt-a", time_zone="Asia/Tokyo")  # every one of its readings changes local day
    publish(home)
    assert built_by(home) == "rebuild"
    assert_same_as_rebuild(home, tmp_path)


def test_a_new_install_with_nothing_registered_updates_its_empty_store(tmp_path: Path):
    """The first runs of an install may load nothing but quarantine (an unregistered device): no pseudonym
    at all, still an update."""
    s = Settings(home=tmp_path / "var")
    with clinical(s) as con:
        run_record(con, 3)
    publish(s)
    with clinical(s) as con:
        run_record(con, 1)
    publish(s)
    assert built_by(s) == "update"
    assert_same_as_rebuild(s, tmp_path)


def state_path(s: Settings) -> Path:
    return Path(s.warehouse_dir) / ".telehealth-state.json"


@pytest.mark.parametrize("tamper", ["truncated", "garbage_streams", "through_text", "claims_more"])
def test_a_state_file_edited_or_planted_is_not_trusted(home: Settings, tmp_path: Path, tamper: str):
    """The state file says what the store already holds. One cut short, mangled, edited to claim rows the store
    never absorbed must never leave the store behind a rebuild, nor fail the
    run: the store is rebuilt."""
    s = home
    old = state_path(s).read_text()
    with clinical(s) as con:
        reading(con, "cuff-a", 2)
        event(con, "app-b", "survey_completed", 3, survey="phq-2")
    publish_snapshot(s)
    state = json.loads(old)
    if tamper == "truncated":
        state_path(s).write_text(old[: len(old) // 2])
    else:
        if tamper == "garbage_streams":
            state["streams"] = "all of them"
        elif tamper == "through_text":
            state["streams"]["readings"]["through"] = "tomorrow"
        elif tamper == "claims_more":  # as if the rows just loaded were already in the store
            with serving(s) as served:
                for stream, table in (("readings", "readings"), ("events", "telehealth_events")):
                    through, count = served.execute(
                        f"SELECT epoch_us(max(loaded_at)), count(*) FROM {table}").fetchone()  # type: ignore[misc]
                    state["streams"][stream] = {**state["streams"][stream], "through": through, "count": count}
        state_path(s).write_text(json.dumps(state))
    publish_telehealth(s)
    assert built_by(s) == "rebuild"
    assert_same_as_rebuild(s, tmp_path)


def test_a_fifo_or_symlink_where_the_state_file_goes_neither_hangs_the_run_nor_is_written_through(
        home: Settings, tmp_path: Path):
    s = home
    victim = tmp_path / "victim"
    victim.write_text("someone else's file\n")
    tmp_state = state_path(s).with_suffix(".tmp")
    tmp_state.symlink_to(victim)
    state_path(s).unlink()
    os.mkfifo(state_path(s))
    with clinical(s) as con:
        reading(con, "cuff-a", 2)
    publish_snapshot(s)
    done = threading.Event()
    worker = threading.Thread(target=lambda: (publish_telehealth(s), done.set()), daemon=True)
    worker.start()
    finished = done.wait(60)
    if not finished:  # unblock the reader so the test ends: it was waiting for a writer on the FIFO
        with open(state_path(s), "w"):
            pass
        worker.join(60)
    assert finished, "the run hung reading a FIFO planted as its state file"
    assert victim.read_text() == "someone else's file\n"
    assert built_by(s) == "rebuild"
    assert_same_as_rebuild(s, tmp_path)


def test_a_run_killed_between_the_store_swap_and_the_state_write_is_followed_by_a_rebuild(
        home: Settings, tmp_path: Path):
    """What a kill -9 there leaves on disk: the new store, the previous run's (valid, signed) state. The state
    names the store file it describes, so the next run cannot mistake it for this store's: it rebuilds."""
    s = home
    before = state_path(s).read_bytes()
    with clinical(s) as con:
        reading(con, "cuff-a", 3)
    publish(s)
    assert built_by(s) == "update"
    state_path(s).write_bytes(before)  # the state write that the kill prevented
    with clinical(s) as con:
        reading(con, "scale-b", 2)
    publish(s)
    assert built_by(s) == "rebuild"
    assert_same_as_rebuild(s, tmp_path)


def test_a_migration_that_changes_the_warehouse_s_local_time_rules_rebuilds_the_store(
        home: Settings, tmp_path: Path):
    """The store's days come from the warehouse's own macro and views (warehouse/sql/), which a migration or an
    upgrade may redefine: an update would keep every untouched patient's rows under the old rule."""
    sql = (Path(__file__).parents[2] / "warehouse" / "sql" / "010_marts.sql").read_text()
    start = sql.index("CREATE OR REPLACE MACRO with_local_time")
    macro = sql[start:sql.index(";", start) + 1]
    assert "AS DATE) AS local_date" in macro
    with clinical(home) as con:
        con.execute(macro.replace("AS DATE) AS local_date", "AS DATE) + 1 AS local_date"))  # a changed rule
        reading(con, "ox-c", 1)
    publish(home)
    assert_same_as_rebuild(home, tmp_path)


def test_registry_edits_crafted_to_cancel_out_still_rebuild_the_store(tmp_path: Path):
    """What the store was built from names the registry by a digest of its rows. A digest that is the XOR of
    64-bit row hashes is linear: out of any 65 edits some subset cancels out exactly, found by elimination in
    a moment. Whoever can edit the registry (free-text names, zones) could so move patients' days with the
    store none the wiser until the daily rebuild. Here ~half of 70 patients move to Tokyo that way."""
    s = Settings(home=tmp_path / "var")
    n = 70
    day = (NOW - timedelta(days=3)).replace(hour=20)  # 20:00 UTC: the same day in New York, the next in Tokyo
    with clinical(s) as con:
        for i in range(n):
            upsert_patient(con, f"pt-{i:03d}", time_zone="America/New_York")
            enroll(con, f"cuff-{i:03d}", f"pt-{i:03d}", kind="bp", valid_from=NOW - timedelta(days=60))
            con.execute("""
                INSERT INTO readings (reading_id, patient_id, device_id, metric, loinc, value, unit, unit_sent,
                                      measured_at, utc_offset_min, received_at, loaded_at, msg_id, segment,
                                      record_no, item_no, manual)
                VALUES (?, ?, ?, 'heart_rate', '8867-4', 70, '/min', '/min', ?, 0, ?, now(), ?, 'seg', ?, 0, false)""",
                        [f"rd-x{i}", f"pt-{i:03d}", f"cuff-{i:03d}", day, NOW, f"mx{i}", i])
        deltas = [con.execute("""SELECT xor((SELECT hash(t) FROM patients t WHERE patient_id = $p)
                                        , (SELECT hash(t) FROM (SELECT * REPLACE ('Asia/Tokyo' AS time_zone)
                                                                FROM patients WHERE patient_id = $p) t))""",
                              {"p": f"pt-{i:03d}"}).fetchone()[0] for i in range(n)]  # type: ignore[index]
    publish(s)
    # A non-empty subset of the edits whose hash changes XOR to zero (Gaussian elimination over GF(2)).
    basis: dict[int, tuple[int, int]] = {}  # leading bit -> (vector, which edits make it)
    subset = 0
    for i, d in enumerate(deltas):
        vec, mask = d, 1 << i
        while vec:
            top = vec.bit_length() - 1
            if top not in basis:
                basis[top] = (vec, mask)
                break
            vec, mask = vec ^ basis[top][0], mask ^ basis[top][1]
        if not vec:
            subset = mask
            break
    moved = [f"pt-{i:03d}" for i in range(n) if subset >> i & 1]
    assert moved
    with clinical(s) as con:
        con.execute("UPDATE patients SET time_zone = 'Asia/Tokyo' WHERE patient_id IN (SELECT unnest($m))",
                    {"m": moved})
    publish(s)
    assert_same_as_rebuild(s, tmp_path)
