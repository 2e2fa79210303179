"""The per-patient-day rollup of readings (``patient_days``, sql/005_patient_days.sql), kept by the load.

Billing counts patient-local days with a device-transmitted reading, the panel wants each patient's last
reading and readings of the last 30 days, the patient view daily aggregates: at 50M readings each of these
scanned every reading (BENCHMARKS.md §4). The load adds each batch's readings here in its own transaction
(``note_loaded``), so the rollup always equals ``patient_days_of('readings')`` — what ``rebuild`` recounts —
for the zone each patient's days were counted in. A registry change of a patient's zone is recounted by
``refresh_zones`` in the registry's own transaction (``registry.upsert_patient``); the load and the
compaction call it too, for a zone changed any other way. ``patient_latest`` (each patient's latest reading
per metric, ``patient_latest_of('patient_days')``) is kept beside it by the same calls.
"""

from __future__ import annotations

import duckdb

# The stored rows of the keys of _pd_new (none for a day the batch opens: most of a large batch's days) ...
STORED = """
CREATE OR REPLACE TEMP TABLE _pd_stored AS
SELECT d.* FROM patient_days d
SEMI JOIN _pd_new n ON n.patient_id = d.patient_id AND n.local_date = d.local_date AND n.metric = d.metric
                   AND n.unit = d.unit
"""
# ... merged with the batch's part of the same day: delete them, insert the merge. Only those keys are combined
# (a flatten of every instant list); a new key's row is _pd_new's as it is (combined_patient_days of one row).
MERGE = """
CREATE OR REPLACE TEMP TABLE _pd_merged AS
SELECT * FROM combined_patient_days('_pd_both');
DELETE FROM patient_days d USING _pd_stored s
WHERE s.patient_id = d.patient_id AND s.local_date = d.local_date AND s.metric = d.metric AND s.unit = d.unit;
INSERT INTO patient_days BY NAME SELECT * FROM _pd_merged;
DROP TABLE _pd_merged;
"""
BOTH = """
CREATE OR REPLACE TEMP VIEW _pd_both AS
SELECT * FROM _pd_stored
UNION ALL BY NAME
SELECT n.* FROM _pd_new n
SEMI JOIN _pd_stored s ON s.patient_id = n.patient_id AND s.local_date = n.local_date AND s.metric = n.metric
                      AND s.unit = n.unit
"""
INSERT_NEW = """
INSERT INTO patient_days BY NAME
SELECT n.* FROM _pd_new n
ANTI JOIN _pd_stored s ON s.patient_id = n.patient_id AND s.local_date = n.local_date AND s.metric = n.metric
                      AND s.unit = n.unit
"""

# The latest rows of the metrics in _pd_new, merged with _pd_new's days: a load only adds readings, so the
# latest of a metric is the later of the stored one and the batch's, and its count their sum.
MERGE_LATEST = """
CREATE OR REPLACE TEMP TABLE _pl_both AS
SELECT patient_id, metric, unit, last_at, readings, latest FROM _pd_new
UNION ALL
SELECT l.patient_id, l.metric, l.unit, l.last_at, l.readings_total AS readings, l.latest
FROM patient_latest l SEMI JOIN _pd_new n ON n.patient_id = l.patient_id AND n.metric = l.metric;
CREATE OR REPLACE TEMP TABLE _pl_merged AS SELECT * FROM patient_latest_of('_pl_both');
DELETE FROM patient_latest l USING _pl_merged m WHERE m.patient_id = l.patient_id AND m.metric = l.metric;
INSERT INTO patient_latest BY NAME SELECT * FROM _pl_merged;
DROP TABLE _pl_both;
DROP TABLE _pl_merged;
"""

# New patients' zones, as their first days are counted.
NOTE_ZONES = """
INSERT INTO patient_day_zones
SELECT DISTINCT n.patient_id, p.time_zone FROM _pd_new n LEFT JOIN patients p USING (patient_id)
ON CONFLICT (patient_id) DO NOTHING
"""


def note_loaded(con: duckdb.DuckDBPyConnection, source: str) -> int:
    """The load's part, in its transaction: add these newly loaded readings to their patients' days.
    ``source``: a table or subquery of the loaded readings with the columns of ``readings``; they must be in
    ``readings`` already. Returns the day rows touched."""
    refreshed = refresh_zones(con)  # recounts include this batch: it must not be added to them twice
    # a view, not a copy: patient_days_of reads it once (copying a million loaded rows cost ~0.5 s)
    con.execute(f"""CREATE OR REPLACE TEMP VIEW _pd_loaded AS
                    SELECT patient_id, metric, unit, value, diastolic, manual, measured_at, utc_offset_min,
                           reading_id, device_id
                    FROM {source} WHERE NOT list_contains({_list_literal(refreshed)}, patient_id)""")
    con.execute("CREATE OR REPLACE TEMP TABLE _pd_new AS SELECT * FROM patient_days_of('_pd_loaded')")
    touched = _count(con, "SELECT count(*) FROM _pd_new")
    if touched:
        con.execute(MERGE_LATEST)
        con.execute(STORED)
        if _count(con, "SELECT count(*) FROM _pd_stored"):
            con.execute(BOTH)
            con.execute(MERGE)
            con.execute("DROP VIEW _pd_both")
        con.execute(INSERT_NEW)
        con.execute("DROP TABLE _pd_stored")
        con.execute(NOTE_ZONES)
    con.execute("DROP TABLE _pd_new")
    con.execute("DROP VIEW _pd_loaded")
    return touched


def _list_literal(values: list[str]) -> str:
    """A VARCHAR[] literal (a view cannot hold a parameter): patient ids, quoted."""
    return "[" + ", ".join("'" + v.replace("'", "''") + "'" for v in values) + "]::VARCHAR[]"


def refresh_zones(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Recount the days of patients whose registered zone changed since their days were counted (their
    local days moved); returns them."""
    changed = [pid for (pid,) in con.execute(
        "SELECT patient_id FROM stg_day_zone_changes ORDER BY patient_id").fetchall()]
    if changed:
        rebuild(con, changed)
    return changed


def rebuild(con: duckdb.DuckDBPyConnection, patient_ids: list[str] | None = None) -> int:
    """Recount the days of these patients (everyone when None) from readings, and record the zone they were
    counted in — after anything that changes readings other than the load (an erasure, a purge, a repair).
    Returns the day rows written."""
    if patient_ids is None:
        con.execute("DELETE FROM patient_days")
        con.execute("DELETE FROM patient_day_zones")
        con.execute("DELETE FROM patient_latest")
        con.execute("INSERT INTO patient_days BY NAME SELECT * FROM patient_days_of('readings')")
        con.execute("INSERT INTO patient_latest BY NAME SELECT * FROM patient_latest_of('patient_days')")
        con.execute("""INSERT INTO patient_day_zones
                       SELECT p.patient_id, p.time_zone FROM patients p
                       WHERE p.patient_id IN (SELECT DISTINCT patient_id FROM readings)""")
        return _count(con, "SELECT count(*) FROM patient_days")
    con.execute("CREATE OR REPLACE TEMP TABLE _pd_patients AS SELECT unnest(?::VARCHAR[]) AS patient_id",
                [patient_ids])
    con.execute("DELETE FROM patient_days WHERE patient_id IN (SELECT patient_id FROM _pd_patients)")
    con.execute("DELETE FROM patient_day_zones WHERE patient_id IN (SELECT patient_id FROM _pd_patients)")
    con.execute("DELETE FROM patient_latest WHERE patient_id IN (SELECT patient_id FROM _pd_patients)")
    con.execute("""CREATE OR REPLACE TEMP VIEW _pd_readings AS
                   SELECT * FROM readings WHERE patient_id IN (SELECT patient_id FROM _pd_patients)""")
    con.execute("INSERT INTO patient_days BY NAME SELECT * FROM patient_days_of('_pd_readings')")
    con.execute("""CREATE OR REPLACE TEMP VIEW _pd_days AS
                   SELECT * FROM patient_days WHERE patient_id IN (SELECT patient_id FROM _pd_patients)""")
    con.execute("INSERT INTO patient_latest BY NAME SELECT * FROM patient_latest_of('_pd_days')")
    con.execute("""INSERT INTO patient_day_zones
                   SELECT p.patient_id, p.time_zone FROM patients p
                   WHERE p.patient_id IN (SELECT DISTINCT patient_id FROM _pd_readings)""")
    written = _count(con, "SELECT count(*) FROM patient_days WHERE patient_id IN "
                          "(SELECT patient_id FROM _pd_patients)")
    con.execute("DROP VIEW _pd_days")
    con.execute("DROP VIEW _pd_readings")
    con.execute("DROP TABLE _pd_patients")
    return written


def _count(con: duckdb.DuckDBPyConnection, sql: str) -> int:
    row = con.execute(sql).fetchone()
    return int(row[0]) if row else 0
