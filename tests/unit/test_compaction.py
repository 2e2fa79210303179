"""Compaction (warehouse/compaction.py): readings rewritten in (patient, time) order into a new encrypted file.

What an operator relies on: nothing is lost or changed but the physical order; a compaction killed at any
point leaves the old file or the new one whole, and the next run finishes (or discards) it; no second writer
gets in meanwhile; clinicians reading a snapshot are not disturbed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest

from core.settings import Settings
from warehouse import compaction, db, patient_days
from warehouse.compaction import compact, compacting_path
from warehouse.db import WarehouseBusy, clinical, open_clinical
from warehouse.registry import upsert_patient
from warehouse.serving import current_snapshot, publish_snapshot, serving

PATIENTS = [f"p-{i}" for i in range(6)]

# A compaction in a child process that stops at ``step``: killed there (SIGKILL) or, with a marker folder,
# announcing the step and waiting for the test's go-ahead.
CHILD = """
import os, signal, sys, pathlib
from core.settings import Settings
from warehouse.compaction import compact
home, stop, how = sys.argv[1], sys.argv[2], sys.argv[3]
def progress(step):
    if step != stop:
        return
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    marker = pathlib.Path(how)
    (marker / "reached").touch()
    while not (marker / "go").exists():
        os.read(os.open(marker / "pipe", os.O_RDONLY), 1)  # blocks until the test writes to the pipe
compact(Settings(home=pathlib.Path(home)), chunk_readings=30, progress=progress)
"""


@pytest.fixture
def warehouse(settings: Settings, insert_reading: Callable[..., str]) -> Settings:
    """Six patients' readings interleaved in arrival order, a registry, alerts' state: a published warehouse."""
    start = datetime(2026, 11, 1, tzinfo=UTC)
    with clinical(settings) as con:
        for pid in PATIENTS:
            upsert_patient(con, pid, time_zone="America/Chicago")
        for i in range(40):  # one reading of each patient per hour: every row group holds every patient
            for pid in PATIENTS:
                insert_reading(con, pid, "heart_rate", 60 + i % 30, start + timedelta(hours=i), rollup=False)
        patient_days.rebuild(con)
        publish_snapshot(settings, con)
    return settings


def contents(s: Settings) -> dict[str, list[tuple]]:
    """Every table's rows, in a fixed order (physical order aside)."""
    con = open_clinical(s, read_only=True)
    try:
        tables = [t for (t,) in con.execute("SELECT table_name FROM duckdb_tables() "
                                            "WHERE database_name = 'clinical' ORDER BY 1").fetchall()]
        return {t: con.execute(f'SELECT * FROM "{t}" ORDER BY ALL').fetchall() for t in tables}
    finally:
        con.close()


def physical_order(s: Settings) -> list[tuple]:
    con = open_clinical(s, read_only=True)
    try:
        return con.execute("SELECT patient_id, measured_at FROM readings ORDER BY rowid").fetchall()
    finally:
        con.close()


def child(s: Settings, stop: str, how: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(s.home), stop, how],
                            cwd=Path(__file__).resolve().parents[2])


def test_compaction_sorts_readings_and_changes_nothing_else(warehouse: Settings) -> None:
    before = contents(warehouse)
    assert physical_order(warehouse) != sorted(physical_order(warehouse))  # arrival order, interleaved
    steps: list[str] = []

    result = compact(warehouse, chunk_readings=80, progress=steps.append)

    assert contents(warehouse) == before
    assert physical_order(warehouse) == sorted(physical_order(warehouse))
    assert result.readings == 240 and steps[0] == "schema" and steps[-3:] == ["copied", "swapped", "published"]
    assert [s for s in steps if s.startswith("readings ")] == ["readings 1/3", "readings 2/3", "readings 3/3"]
    assert not compacting_path(warehouse).exists()
    with serving(warehouse) as con:  # the new snapshot is the compacted file
        assert con.execute("SELECT patient_id FROM readings ORDER BY rowid LIMIT 1").fetchone() == ("p-0",)


@pytest.mark.parametrize("stop", ["schema", "readings 2/6", "copied", "swapped"])
def test_a_compaction_killed_at_any_step_leaves_a_whole_warehouse(warehouse: Settings, stop: str) -> None:
    before = contents(warehouse)
    proc = child(warehouse, stop, "kill")
    assert proc.wait(timeout=120) == -signal.SIGKILL

    # Whatever the step, the warehouse opens under its key with every row; before the swap it is the old file
    # (and a partial new one lies beside it), after the swap the new one.
    assert contents(warehouse) == before
    swapped = stop == "swapped"
    assert (physical_order(warehouse) == sorted(physical_order(warehouse))) is swapped
    assert compacting_path(warehouse).exists() is (stop in ("schema", "readings 2/6", "copied"))

    steps: list[str] = []
    compact(warehouse, chunk_readings=30, progress=steps.append)  # the next run discards and finishes
    assert ("discarded" in steps) is (not swapped)
    assert contents(warehouse) == before
    assert physical_order(warehouse) == sorted(physical_order(warehouse))
    assert not compacting_path(warehouse).exists()


def test_no_other_writer_gets_in_and_readers_are_not_disturbed(warehouse: Settings, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "marker"
    marker.mkdir()
    os.mkfifo(marker / "pipe")
    with serving(warehouse) as con:
        seen = con.execute("SELECT count(*), max(measured_at) FROM readings").fetchone()
    snapshot = current_snapshot(warehouse)
    proc = child(warehouse, "readings 4/6", str(marker))
    try:
        deadline = time.monotonic() + 120
        while not (marker / "reached").exists():  # the child announces the step it stopped at
            assert proc.poll() is None and time.monotonic() < deadline, "the compaction never got there"
            time.sleep(0.05)
        # Mid-rewrite: a writer (a pipeline task) is refused after its wait; a clinician reads as before.
        monkeypatch.setattr(db, "LOCK_WAIT_S", 0.5)
        with pytest.raises(WarehouseBusy):
            open_clinical(warehouse).close()
        with serving(warehouse) as con:
            assert con.execute("SELECT count(*), max(measured_at) FROM readings").fetchone() == seen
        assert current_snapshot(warehouse) == snapshot
    finally:
        (marker / "go").touch()
        with open(marker / "pipe", "wb") as pipe:
            pipe.write(b"x")
    assert proc.wait(timeout=120) == 0
    assert current_snapshot(warehouse) != snapshot  # the compacted file published for the next read
    with serving(warehouse) as con:
        assert con.execute("SELECT count(*), max(measured_at) FROM readings").fetchone() == seen


def test_a_copy_that_lost_rows_is_never_swapped_in(warehouse: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy that does not match (here: a table that lost its rows on the way) is never swapped in."""
    import warehouse.compaction as compaction

    before = contents(warehouse)
    real = compaction._copy_readings

    def lossy(con: duckdb.DuckDBPyConnection, *args: object) -> None:
        real(con, *args)  # type: ignore[arg-type]
        con.execute("DELETE FROM compacted.readings WHERE patient_id = 'p-3'")

    monkeypatch.setattr(compaction, "_copy_readings", lossy)
    with pytest.raises(compaction.CompactionError, match="readings"):
        compact(warehouse)
    assert contents(warehouse) == before


def test_a_reading_id_stored_twice_fails_the_compaction_loudly(warehouse: Settings) -> None:
    """readings has no key index (migration 005): if anything but the load ever wrote a reading twice, the daily
    compaction names it and swaps nothing."""
    with clinical(warehouse) as con:
        con.execute("INSERT INTO readings SELECT * FROM readings WHERE patient_id = 'p-2' LIMIT 2")
    before = contents(warehouse)
    with pytest.raises(compaction.CompactionError, match="2 readings repeat another's reading_id"):
        compact(warehouse)
    assert contents(warehouse) == before


def test_a_recount_that_fails_leaves_the_rollup_as_it_was(warehouse: Settings) -> None:
    """The compaction recounts patients whose zone changed behind the registry. Its recount deleted their
    days and zone record, then failed to insert them again (here: a zone this DuckDB does not know — an edit,
    or a zone a tzdata update dropped); the deletes were committed on their own, the compaction failed, and
    the patient dropped out of the rollup for good: no zone record, so no later load or compaction ever
    recounted them, and billing and the panel lost their days. All or nothing: the rollup stays as it was."""
    with clinical(warehouse) as con:
        days = con.execute("SELECT * FROM patient_days ORDER BY ALL").fetchall()
        latest = con.execute("SELECT * FROM patient_latest ORDER BY ALL").fetchall()
        assert any(d[0] == "p-2" for d in days) and any(r[0] == "p-2" for r in latest)
        con.execute("UPDATE patients SET time_zone = 'Mars/Olympus_Mons' WHERE patient_id = 'p-2'")
    with pytest.raises(duckdb.Error):
        compact(warehouse)
    with clinical(warehouse) as con:
        assert con.execute("SELECT * FROM patient_days ORDER BY ALL").fetchall() == days
        assert con.execute("SELECT * FROM patient_latest ORDER BY ALL").fetchall() == latest
        assert con.execute("SELECT patient_id FROM stg_day_zone_changes").fetchall() == [("p-2",)]  # still owed
        con.execute("UPDATE patients SET time_zone = 'Europe/Berlin' WHERE patient_id = 'p-2'")
    compact(warehouse)  # the zone fixed: recounted, and the rollup equals a rebuild
    with clinical(warehouse) as con:
        rollup, rebuilt = (con.execute(f"SELECT * REPLACE (list_sort(at_us) AS at_us) FROM {source} ORDER BY ALL"
                                       ).fetchall() for source in ("patient_days", "patient_days_of('readings')"))
        assert rollup == rebuilt
        latest, folded = (con.execute(f"SELECT * FROM {source} ORDER BY ALL").fetchall()
                          for source in ("patient_latest", "patient_latest_of('patient_days')"))
        assert latest == folded
        assert ("p-2", "Europe/Berlin") in con.execute("SELECT * FROM patient_day_zones").fetchall()
