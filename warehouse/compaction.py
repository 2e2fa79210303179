"""Compaction: rewrite the clinical warehouse with readings in (patient_id, measured_at) order, and swap it in.

Loads append readings in arrival order, so every row group holds every patient and each per-patient query
scans the whole patient_id column (87 ms at 50M readings, four times per patient view: BENCHMARKS.md §4).
Sorted by patient, DuckDB's zone maps skip all but a patient's own row groups. Sorting in place grew the
file 2.2 -> 4.2 GB (the old row groups stay until a vacuum that never comes), so compaction writes a NEW
encrypted file, as key rotation does (rpmctl/admin/rotate.py):

- the whole rewrite runs inside ``clinical()``: this process's turn at the file and DuckDB's write lock on it,
  so no pipeline task or second compaction writes meanwhile (they wait, up to db.LOCK_WAIT_S, and retry);
- the new file ``clinical.duckdb.compacting`` is written under the warehouse's own key, its row counts checked
  table by table against the old one, checkpointed, fsynced, and only then renamed over the old file
  (atomic); the folder is fsynced after. A crash before the rename leaves the old file whole and a partial
  new one that the next run deletes and writes again; after it, the new file is whole;
- readers read serving snapshots (separate files, warehouse/serving.py), never the live file: a compaction
  does not touch them; it publishes a new snapshot in the compacted order when done.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import duckdb

from core import keys
from core.settings import Settings
from warehouse.db import clinical, one_row, transaction
from warehouse.patient_days import refresh_zones
from warehouse.serving import publish_snapshot

CHUNK_READINGS = 2_000_000  # readings per insert into the new file: whole patients, each chunk sorted
# Tables written in a physical order of their own; every other table is copied as it is.
ORDER = {
    "readings": "patient_id, measured_at, reading_id",
    "patient_days": "patient_id, local_date, metric, unit",
    "patient_latest": "patient_id, metric",
}


class CompactionError(RuntimeError):
    """The new file did not match the old one: nothing was swapped, the warehouse is as it was."""


@dataclass(frozen=True)
class Compacted:
    """What one compaction rewrote."""
    tables: int
    rows: int
    readings: int
    bytes_before: int
    bytes_after: int

    def to_xcom(self) -> dict:
        return asdict(self)


def compacting_path(s: Settings) -> Path:
    return s.clinical_db.with_name(s.clinical_db.name + ".compacting")


def discard_unfinished(s: Settings) -> bool:
    """Delete what a compaction that died before its swap left (the new file and its WAL); True if any."""
    found = False
    for path in (compacting_path(s), compacting_path(s).with_name(compacting_path(s).name + ".wal")):
        if path.exists():
            path.unlink()
            found = True
    return found


def compact(s: Settings, chunk_readings: int = CHUNK_READINGS,
            progress: Callable[[str], None] = lambda step: None, memory_limit: str | None = None) -> Compacted:
    """Rewrite the warehouse with readings sorted by (patient_id, measured_at) into a new encrypted file and
    swap it in; then publish a serving snapshot of it. ``progress`` is told each step as it completes
    ("discarded", "schema", "readings <n>", "copied", "swapped", "published").

    memory_limit: DuckDB's limit for the rewrite (default: the warehouse's). Each chunk is sorted in memory
    (spilling past the limit); readings have no key index to build since migration 005."""
    db, new = s.clinical_db, compacting_path(s)
    bytes_before = db.stat().st_size
    with clinical(s) as con:  # holds the write lock for the whole rewrite: no pipeline write can interleave
        if discard_unfinished(s):
            progress("discarded")
        if memory_limit:
            con.execute("SET memory_limit = ?", [memory_limit])
        with transaction(con):  # a recount that fails must not leave the patient's days deleted (autocommit)
            refresh_zones(con)  # a zone changed since the last load: store the recount before copying the rollup
        con.execute("CHECKPOINT")
        key = keys.warehouse_key(s)  # opening promoted a key a rotation had staged, if any
        con.execute(f"ATTACH '{_sql_path(new)}' AS compacted (ENCRYPTION_KEY '{key}')")
        try:
            con.execute("COPY FROM DATABASE clinical TO compacted (SCHEMA)")
            progress("schema")
            tables = [t for (t,) in con.execute(
                "SELECT table_name FROM duckdb_tables() WHERE database_name = 'clinical' ORDER BY 1").fetchall()]
            # One checkpoint at the end, not one per chunk: the new file is written once.
            con.execute("SET checkpoint_threshold = '1TB'")
            for table in tables:
                if table == "readings":
                    _copy_readings(con, chunk_readings, progress)
                else:
                    order = f" ORDER BY {ORDER[table]}" if table in ORDER else ""
                    con.execute(f'INSERT INTO compacted."{table}" SELECT * FROM clinical."{table}"{order}')
            rows = _verify(con, tables)
            con.execute("CHECKPOINT compacted")
        finally:  # a failed statement left no transaction open (each chunk rolls back its own)
            con.execute("RESET checkpoint_threshold")
            con.execute("DETACH DATABASE IF EXISTS compacted")
        wal = new.with_name(new.name + ".wal")
        if wal.exists():  # everything must be in the file itself before it replaces the old one
            raise CompactionError(f"{wal} remained after the checkpoint: nothing swapped")
        _fsync(new)
        progress("copied")
        readings = rows["readings"]
        os.replace(new, db)
        _fsync(db.parent)
        progress("swapped")
    publish_snapshot(s)
    progress("published")
    return Compacted(len(tables), sum(rows.values()), readings, bytes_before, db.stat().st_size)


def _copy_readings(con: duckdb.DuckDBPyConnection, chunk_readings: int, progress: Callable[[str], None]) -> None:
    """Readings into the new file sorted, a run of whole patients per transaction (~chunk_readings each)."""
    per_patient = con.execute("SELECT patient_id, count(*) FROM clinical.readings GROUP BY patient_id "
                              "ORDER BY patient_id").fetchall()
    bounds: list[tuple[str, str]] = []
    size = 0
    for patient_id, n in per_patient:
        if not bounds or size + n > chunk_readings and size:
            bounds.append((patient_id, patient_id))
            size = 0
        bounds[-1] = (bounds[-1][0], patient_id)
        size += n
    for n, (first, last) in enumerate(bounds, start=1):
        with transaction(con):
            con.execute(f"""INSERT INTO compacted.readings SELECT * FROM clinical.readings
                            WHERE patient_id BETWEEN ? AND ? ORDER BY {ORDER['readings']}""", [first, last])
        progress(f"readings {n}/{len(bounds)}")


def _verify(con: duckdb.DuckDBPyConnection, tables: list[str]) -> dict[str, int]:
    """Rows per table, equal in the old and the new file (else CompactionError)."""
    rows = {}
    for t in tables:
        before = con.execute(f'SELECT count(*) FROM clinical."{t}"').fetchone()
        after = con.execute(f'SELECT count(*) FROM compacted."{t}"').fetchone()
        if before != after:
            raise CompactionError(f"the compacted copy of {t} has {after} rows, expected {before}: nothing "
                                  "swapped")
        rows[t] = int(before[0]) if before else 0
    # Nothing but the load's classification keeps a reading_id to one row since readings lost their key
    # index (migration 005): the daily pass over every reading checks it, and a broken promise fails loudly.
    repeated = one_row(con.execute("SELECT count(*) - count(DISTINCT reading_id) FROM compacted.readings"))[0]
    if repeated:
        raise CompactionError(f"{repeated} readings repeat another's reading_id, which the load never writes: "
                              "nothing swapped; keep the warehouse as it is and report it")
    return rows


def _sql_path(path: Path) -> str:
    return str(path).replace("'", "''")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
