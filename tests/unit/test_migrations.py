"""Versioned migrations: a warehouse made by the previous release opens under this one with its data, each
migration runs once and in order, a failed one leaves nothing behind, and an applied one cannot be edited.

The previous release's schema is vendored as text (tests/fixtures/warehouse-0.1.0/sql: the definitions
release 0.1.0 ran on every connect); the warehouse made from it is encrypted like a real one.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pytest

from core import keys
from core.settings import Settings
from warehouse.db import MigrationError, clinical, httpfs_extension, migrate, migrations_dir, open_clinical

RELEASE_0_1 = Path(__file__).resolve().parents[1] / "fixtures" / "warehouse-0.1.0" / "sql"


def release_0_1_connection(s: Settings) -> duckdb.DuckDBPyConnection:
    """The release-0.1 clinical file attached as release 0.1 would (no migration runs)."""
    con = duckdb.connect()
    con.execute(f"LOAD '{httpfs_extension()}'")
    con.execute(f"ATTACH '{s.clinical_db}' AS clinical (ENCRYPTION_KEY '{keys.warehouse_key(s)}')")
    con.execute("USE clinical")
    return con


def make_release_0_1_warehouse(s: Settings) -> None:
    """The clinical file as release 0.1.0 left it, with one quarantined item of each sort."""
    s.warehouse_dir.mkdir(parents=True, exist_ok=True)
    con = release_0_1_connection(s)
    try:
        for path in sorted(RELEASE_0_1.glob("*.sql")):
            con.execute(path.read_text())
        now = datetime.now(UTC)
        con.execute("""INSERT INTO quarantine VALUES
            ('seg:0:0', 'seg', 0, 0, 'bp-1', NULL, ['not_json'], 'Expecting value', 'x'::BLOB, ?, ?, 'r0'),
            ('seg:1:0', 'seg', 1, 0, 'bp-1', 'abc', ['plausible_heart_rate'], NULL, '{}'::BLOB, ?, ?, 'r0')""",
                    [now, now, now, now])
        con.execute("INSERT INTO patients (patient_id) VALUES ('pt-old')")
    finally:
        con.close()


def columns(con, table: str) -> list[str]:
    return [r[0] for r in con.execute(f"DESCRIBE {table}").fetchall()]


def test_a_warehouse_of_the_previous_release_is_migrated_with_its_data(settings: Settings) -> None:
    make_release_0_1_warehouse(settings)
    with clinical(settings) as con:
        assert "kind" in columns(con, "quarantine")  # a column added to an existing table
        assert "rejected_segments" in {r[0] for r in con.execute("SHOW TABLES").fetchall()}
        assert con.execute("SELECT row_key, kind FROM quarantine ORDER BY row_key").fetchall() == [
            ("seg:0:0", "message"), ("seg:1:0", None)]  # structural rows classified; the rest left to replay
        assert con.execute("SELECT patient_id FROM patients").fetchall() == [("pt-old",)]
        applied = con.execute("SELECT version, name FROM schema_migrations ORDER BY version").fetchall()
    assert applied == [(int(p.stem.split("_")[0]), p.stem) for p in sorted(migrations_dir().glob("*.sql"))]


def test_cgm_readings_coded_as_blood_glucose_are_recoded_as_interstitial(settings: Settings) -> None:
    """Release 0.1 coded CGM readings 2339-0 (glucose in blood): 002 recodes them 99504-3 (interstitial fluid),
    loaded or still staged by a run that did not finish; a meter's capillary 41653-7 stays."""
    make_release_0_1_warehouse(settings)
    con = release_0_1_connection(settings)
    try:
        now = datetime.now(UTC)
        for reading_id, loinc, source in (("cgm-1", "2339-0", "cgm"), ("meter-1", "41653-7", "meter")):
            con.execute("""INSERT INTO readings (reading_id, patient_id, device_id, metric, loinc, value, unit,
                                                 unit_sent, source, measured_at, utc_offset_min, received_at,
                                                 loaded_at, msg_id, segment, record_no, item_no)
                           VALUES (?, 'pt-old', 'dev-1', 'blood_glucose', ?, 110, 'mg/dL', 'mg/dL', ?, ?, 0, ?,
                                   ?, ?, 'seg', 0, 0)""", [reading_id, loinc, source, now, now, now, reading_id])
        con.execute("""INSERT INTO stg_candidates (batch_id, row_key, metric, loinc, source)
                       VALUES ('b-1', 'seg:2:0', 'blood_glucose', '2339-0', 'cgm')""")
    finally:
        con.close()
    with clinical(settings) as con:
        assert con.execute("SELECT reading_id, loinc FROM readings ORDER BY 1").fetchall() == [
            ("cgm-1", "99504-3"), ("meter-1", "41653-7")]
        assert con.execute("SELECT loinc FROM stg_candidates").fetchall() == [("99504-3",)]
        assert ("002_cgm_loinc",) in con.execute("SELECT name FROM schema_migrations").fetchall()


def test_acknowledgements_made_before_their_history_existed_become_its_first_rows(settings: Settings) -> None:
    """003: an alert acknowledged under release 0.1 keeps that acknowledgement, now as the first of its
    history (alert_acks), so the next one adds to it instead of overwriting the only copy."""
    make_release_0_1_warehouse(settings)
    con = release_0_1_connection(settings)
    try:
        at = datetime(2026, 1, 5, 9, 30, tzinfo=UTC)
        for alert_id, by, resolved in (("a-acked", "dr-a", None), ("a-late", "dr-b", at.replace(hour=8)),
                                       ("a-open", None, None)):
            con.execute("""INSERT INTO alerts (alert_id, patient_id, rule, severity, opened_at, opened_reading_id,
                                               last_breach_at, breaches, evaluated_at, resolved_at,
                                               acknowledged_by, acknowledged_at, ack_note)
                           VALUES (?, 'pt-old', 'bp_severe', 1, ?, 'r-1', ?, 1, ?, ?, ?, ?, ?)""",
                        [alert_id, at, at, at, resolved, by, at if by else None, f"note of {by}" if by else None])
    finally:
        con.close()
    with clinical(settings) as con:
        assert con.execute("SELECT alert_id, clinician_id, acknowledged_at, note, rule, resolved FROM alert_acks "
                           "ORDER BY alert_id").fetchall() == [
            ("a-acked", "dr-a", at, "note of dr-a", "bp_severe", False),
            ("a-late", "dr-b", at, "note of dr-b", "bp_severe", True)]


def test_readings_loaded_before_the_rollups_existed_are_counted_in_them(settings: Settings) -> None:
    """004 counts the days of readings already loaded and 006 folds each patient's latest reading per metric
    from them: the first glance (mart_latest_vitals) shows the readings the warehouse held before."""
    make_release_0_1_warehouse(settings)
    con = release_0_1_connection(settings)
    try:
        for reading_id, value, at in (("hr-1", 61.0, datetime(2026, 1, 5, 9, tzinfo=UTC)),
                                      ("hr-2", 72.0, datetime(2026, 1, 6, 9, tzinfo=UTC))):
            con.execute("""INSERT INTO readings (reading_id, patient_id, device_id, metric, loinc, value, unit,
                                                 unit_sent, measured_at, utc_offset_min, received_at, loaded_at,
                                                 msg_id, segment, record_no, item_no)
                           VALUES (?, 'pt-old', 'dev-1', 'heart_rate', '8867-4', ?, '/min', '/min', ?, 0, ?, ?,
                                   ?, 'seg', 0, 0)""", [reading_id, value, at, at, at, reading_id])
    finally:
        con.close()
    with clinical(settings) as con:
        assert con.execute("SELECT patient_id, metric, value, measured_at, readings_total FROM mart_latest_vitals"
                           ).fetchall() == [("pt-old", "heart_rate", 72.0, datetime(2026, 1, 6, 9, tzinfo=UTC), 2)]
        assert con.execute("SELECT count(*) FROM patient_days").fetchone() == (2,)


def test_each_migration_runs_once(settings: Settings) -> None:
    make_release_0_1_warehouse(settings)
    with clinical(settings) as con:
        first = con.execute("SELECT version, applied_at FROM schema_migrations").fetchall()
        assert migrate(con) == []  # opening already migrated: nothing more
    with clinical(settings) as con:
        assert con.execute("SELECT version, applied_at FROM schema_migrations").fetchall() == first


def test_migrations_run_in_version_order_and_a_failed_one_leaves_nothing(settings: Settings,
                                                                          tmp_path: Path) -> None:
    mig = tmp_path / "migrations"
    mig.mkdir()
    (mig / "902_second.sql").write_text("ALTER TABLE patients ADD COLUMN b INTEGER; UPDATE patients SET b = a + 1;")
    (mig / "901_first.sql").write_text("ALTER TABLE patients ADD COLUMN a INTEGER; UPDATE patients SET a = 1;")
    (mig / "903_broken.sql").write_text("ALTER TABLE patients ADD COLUMN c INTEGER; SELECT no_such_column FROM patients;")
    con = open_clinical(settings)
    try:
        con.execute("INSERT INTO patients (patient_id) VALUES ('p1')")
        with pytest.raises(MigrationError, match="903_broken failed, nothing of it applied"):
            migrate(con, mig)
        assert con.execute("SELECT a, b FROM patients").fetchall() == [(1, 2)]  # 901 before 902
        assert "c" not in columns(con, "patients")
        assert {r[0] for r in con.execute("SELECT name FROM schema_migrations").fetchall()} >= {
            "901_first", "902_second"} and "903_broken" not in {
            r[0] for r in con.execute("SELECT name FROM schema_migrations").fetchall()}
    finally:
        con.close()


def test_an_applied_migration_that_was_edited_is_refused(settings: Settings, tmp_path: Path) -> None:
    mig = tmp_path / "migrations"
    mig.mkdir()
    (mig / "901_first.sql").write_text("ALTER TABLE patients ADD COLUMN a INTEGER;")
    con = open_clinical(settings)
    try:
        migrate(con, mig)
        (mig / "901_first.sql").write_text("ALTER TABLE patients ADD COLUMN a BIGINT;")
        with pytest.raises(MigrationError, match="901_first was changed after this warehouse applied it"):
            migrate(con, mig)
    finally:
        con.close()
