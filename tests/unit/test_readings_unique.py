"""A reading_id is in readings at most once — kept by the load's classification, not by an index.

readings has no primary key (an ART index is rewritten whole at every DuckDB checkpoint: sql/001_schema.sql),
so every way a reading could be inserted twice is tried here: the same reading in two runs back to back and in
two groups of one load, a load that dies after inserting and is run again, a quarantined copy replayed after
the reading loaded, a compaction followed by a redelivery, and a warehouse of the previous release (whose
readings had the key) migrated and loaded onto. The accounting balances after each.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import warehouse.db
import warehouse.load
from core.settings import Settings
from pipeline import Sizes
from pipeline.replay import replay_quarantine
from tests.steps import SIZES, claim_segments, load_batch, stage_batch, validate_batch
from tests.unit.test_migrations import make_release_0_1_warehouse
from warehouse.accounting import accounting
from warehouse.compaction import compact
from warehouse.db import clinical
from warehouse.registry import enroll, upsert_patient

DEVICE = "dev-1"
TOPIC = f"rpm/v1/devices/{DEVICE}/vitals"
ENROLLED = "device_enrolled_at_measured_time"


def run(s: Settings, run_id: str, sizes: Sizes = SIZES) -> dict:
    batch = claim_segments(s)
    stage_batch(s, batch, sizes)
    validate_batch(s, batch, sizes)
    return load_batch(s, batch, run_id, sizes)


def readings(s: Settings) -> tuple[int, int]:
    """(rows, distinct reading ids) in readings."""
    with clinical(s) as con:
        return con.execute("SELECT count(*), count(DISTINCT reading_id) FROM readings").fetchone()  # type: ignore[return-value]


def assert_unique(s: Settings, expected: int) -> None:
    assert readings(s) == (expected, expected)
    assert accounting(s)["balanced"] is True


@pytest.fixture
def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


@pytest.fixture
def enrolled(settings: Settings, now: datetime) -> None:
    with clinical(settings) as con:
        upsert_patient(con, "pat-1")
        enroll(con, DEVICE, "pat-1", kind="hub", valid_from=now - timedelta(days=2))


@pytest.fixture
def hr(make_reading: Callable[..., dict[str, Any]], now: datetime) -> dict[str, Any]:
    return make_reading("heart_rate", measured_at=now - timedelta(minutes=10), msg_id="hr")


def test_the_same_reading_in_runs_back_to_back_loads_once(
        settings: Settings, enrolled: None, hr: dict, make_reading, write_segment, now: datetime) -> None:
    write_segment("ingest-1-000001", [(TOPIC, hr)], received_at=now)
    assert run(settings, "r1")["loaded"] == 1
    write_segment("ingest-1-000002", [(TOPIC, hr), (TOPIC, make_reading("spo2", msg_id="new"))], received_at=now)

    assert run(settings, "r2") == {"loaded": 1, "quarantined": 0, "duplicates": 1, "segments": 1}
    assert_unique(settings, 2)


def test_the_same_reading_in_two_groups_of_one_load_loads_once(
        settings: Settings, enrolled: None, hr: dict, write_segment, now: datetime) -> None:
    """The second group classifies against what the first committed."""
    write_segment("ingest-1-000001", [(TOPIC, hr)], received_at=now)
    write_segment("ingest-1-000002", [(TOPIC, hr), (TOPIC, hr)], received_at=now)

    assert run(settings, "r1", Sizes(load_items=1)) == {"loaded": 1, "quarantined": 0, "duplicates": 2,
                                                       "segments": 2}
    assert_unique(settings, 1)


def test_a_load_killed_after_inserting_its_readings_loads_them_once_when_run_again(
        settings: Settings, enrolled: None, hr: dict, make_reading, write_segment, now: datetime,
        monkeypatch: pytest.MonkeyPatch) -> None:
    write_segment("ingest-1-000001", [(TOPIC, hr), (TOPIC, make_reading("spo2"))], received_at=now)
    batch = claim_segments(settings)
    stage_batch(settings, batch)
    validate_batch(settings, batch)

    def dies(*args: Any) -> None:  # after INSERT_READINGS, before the ledger and COMMIT
        raise MemoryError("killed mid-group")

    with monkeypatch.context() as m:
        m.setattr(warehouse.load, "note_loaded", dies)
        with pytest.raises(MemoryError):
            load_batch(settings, batch, "r1")
    assert readings(settings) == (0, 0)

    assert load_batch(settings, batch, "r1")["loaded"] == 2
    assert load_batch(settings, batch, "r1")["loaded"] == 0
    assert_unique(settings, 2)


def test_a_quarantined_copy_replayed_after_its_reading_loaded_is_a_duplicate(
        settings: Settings, hr: dict, write_segment, now: datetime) -> None:
    write_segment("ingest-1-000001", [(TOPIC, hr)], received_at=now)
    assert run(settings, "r1")["quarantined"] == 1  # the device was not enrolled yet
    with clinical(settings) as con:
        upsert_patient(con, "pat-1")
        enroll(con, DEVICE, "pat-1", kind="hub", valid_from=now - timedelta(days=2))
    write_segment("ingest-1-000002", [(TOPIC, hr)], received_at=now)
    assert run(settings, "r2")["loaded"] == 1  # resent after the enrollment

    result = replay_quarantine(settings, ENROLLED)

    assert (result.loaded, result.duplicates) == (0, 1)
    assert replay_quarantine(settings, ENROLLED).examined == 0
    assert_unique(settings, 1)


def test_a_redelivery_after_a_compaction_is_a_duplicate(
        settings: Settings, enrolled: None, hr: dict, make_reading, write_segment, now: datetime) -> None:
    write_segment("ingest-1-000001", [(TOPIC, hr), (TOPIC, make_reading("spo2", msg_id="o2"))], received_at=now)
    run(settings, "r1")
    compact(settings)
    assert_unique(settings, 2)
    write_segment("ingest-1-000002", [(TOPIC, hr)], received_at=now)

    assert run(settings, "r2")["duplicates"] == 1
    assert_unique(settings, 2)


def test_a_warehouse_whose_readings_had_the_key_is_migrated_and_keeps_loading_once(
        settings: Settings, hr: dict, make_reading, write_segment, now: datetime, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The previous release's warehouse (readings with its primary key, migrations up to 004) loses the
    index, keeps every row, column and NOT NULL, and a redelivery onto it is still a duplicate."""
    before_005 = tmp_path / "migrations-004"
    before_005.mkdir()
    for path in sorted(warehouse.db.migrations_dir().glob("*.sql")):
        if int(path.stem.split("_")[0]) < 5:
            shutil.copy(path, before_005)
    make_release_0_1_warehouse(settings)  # readings created with `reading_id VARCHAR PRIMARY KEY`
    with monkeypatch.context() as m:
        m.setattr(warehouse.db, "migrations_dir", lambda: before_005)
        with clinical(settings) as con:
            upsert_patient(con, "pat-1")
            enroll(con, DEVICE, "pat-1", kind="hub", valid_from=now - timedelta(days=2))
        write_segment("ingest-1-000001", [(TOPIC, hr), (TOPIC, make_reading("spo2"))], received_at=now)
        assert run(settings, "r1")["loaded"] == 2
        with clinical(settings) as con:
            assert key_constraints(con) == ["PRIMARY KEY"]
            old = con.execute("SELECT * FROM readings ORDER BY reading_id").fetchall()
            old_columns = columns(con)

    with clinical(settings) as con:  # this release: 005 applies
        assert key_constraints(con) == []
        assert con.execute("SELECT * FROM readings ORDER BY reading_id").fetchall() == old
        assert columns(con) == old_columns
        assert ("005_readings_without_key",) in con.execute("SELECT name FROM schema_migrations").fetchall()
    write_segment("ingest-1-000002", [(TOPIC, hr), (TOPIC, make_reading("body_weight"))], received_at=now)

    assert run(settings, "r2") == {"loaded": 1, "quarantined": 0, "duplicates": 1, "segments": 1}
    assert readings(settings) == (3, 3)  # (the fixture's quarantine rows have no ledger: no balance to check)


def columns(con: Any) -> list[tuple]:
    """readings' columns in order: name, type, nullable, default (DESCRIBE without its key marker)."""
    return [(name, kind, null, default) for name, kind, null, _key, default, _extra
            in con.execute("DESCRIBE readings").fetchall()]


def key_constraints(con: Any) -> list[str]:
    return [r[0] for r in con.execute("""SELECT constraint_type FROM duckdb_constraints()
                                         WHERE database_name = 'clinical' AND table_name = 'readings'
                                           AND constraint_type IN ('PRIMARY KEY', 'UNIQUE')""").fetchall()]
