"""The readings key: what a primary-key index on ``readings`` costs the load, against the alternatives.

    python -m bench.readings_key                                  # 1M onto 1M, then 5,000 onto 10M
    python -m bench.readings_key --size 1000000 --history 10000000 --shapes varchar,uhugeint,none

DuckDB 1.5.5 keeps a primary key in an ART index and rewrites the whole index at every checkpoint, so what a
key costs grows with the history, not with the batch. Four shapes of the same ``readings`` table (the
warehouse's columns, an encrypted file as the warehouse is):

* ``varchar``  — ``reading_id VARCHAR PRIMARY KEY`` (32 hex characters): the baseline, the shape before;
* ``uhugeint`` — ``reading_id`` kept as text, the key a derived 16-byte ``UHUGEINT`` column;
* ``blob``     — the same with a 16-byte ``BLOB`` key;
* ``none``     — no index: uniqueness kept by the load's classification (a LEFT JOIN of the batch on
  ``reading_id``, which the load runs anyway).

Two measurements per shape, each step in a process of its own (its ``ru_maxrss`` is the step's memory):
``--size`` new readings classified and inserted onto ``--size`` loaded ones, and ``--then`` new readings
(1 % of them already loaded) onto a ``--history`` built in compacted order (patient, time): classify, insert,
commit, then the checkpoint — its seconds, and how many of the file's 256 KiB blocks it rewrote.
"""

from __future__ import annotations

import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import machine, parser, print_table, write_json

BLOCK = 262_144  # DuckDB's default block size
SHAPES = ("varchar", "uhugeint", "blob", "none")
PATIENTS_PER = 1_000  # readings per patient in the generated history
MEMORY_LIMIT = "1GB"  # the warehouse's default (RPM_WAREHOUSE_MEMORY_LIMIT)

def readings_columns() -> str:
    """Every column of this release's ``readings`` but ``reading_id``, as its schema and migrations define them
    (the shapes measured differ only in the key)."""
    import duckdb

    from warehouse.db import migrate

    con = duckdb.connect()
    migrate(con)
    cols = con.execute("SELECT column_name, data_type, is_nullable, column_default FROM duckdb_columns() "
                       "WHERE table_name = 'readings' AND column_name <> 'reading_id' ORDER BY column_index")
    return ", ".join(f"{name} {dtype}" + ("" if nullable else " NOT NULL")
                     + (f" DEFAULT {default}" if default is not None else "")
                     for name, dtype, nullable, default in cols.fetchall())


KEY_COLUMN = {
    "varchar": "reading_id VARCHAR PRIMARY KEY,",
    "uhugeint": "reading_id VARCHAR NOT NULL, rkey UHUGEINT PRIMARY KEY,",
    "blob": "reading_id VARCHAR NOT NULL, rkey BLOB PRIMARY KEY,",
    "none": "reading_id VARCHAR NOT NULL,",
}
KEY_EXPR = {  # the derived key of a 32-hex-character id
    "uhugeint": "(('0x' || {id}[1:16])::UBIGINT::UHUGEINT << 64) | ('0x' || {id}[17:32])::UBIGINT::UHUGEINT",
    "blob": "unhex({id})",
}
JOIN_ON = {"varchar": "reading_id", "uhugeint": "rkey", "blob": "rkey", "none": "reading_id"}


def rows_sql(first: str, count: str, patients: str, offset_days: int, dup_every: int = 0) -> str:
    """SELECT of generated readings i in [first, first + count): patient i // PATIENTS_PER (mod ``patients``),
    one reading every 10 minutes per patient from ``offset_days`` ago; every ``dup_every``-th row repeats an
    already loaded id (i - first) instead (a redelivery)."""
    rid = f"md5((CASE WHEN {dup_every} > 0 AND i % {max(dup_every, 1)} = 0 THEN i - {first} ELSE i END)::VARCHAR)"
    return f"""
    SELECT {rid} AS reading_id,
           'p-' || lpad(((i // {PATIENTS_PER}) % {patients})::VARCHAR, 6, '0') AS patient_id,
           'dev-' || lpad(((i // {PATIENTS_PER}) % {patients})::VARCHAR, 6, '0') || '-' || (i % 5) AS device_id,
           ['blood_pressure', 'heart_rate', 'spo2', 'body_weight', 'blood_glucose'][i % 5 + 1] AS metric,
           '8480-6' AS loinc, 60 + (i % 97)::DOUBLE AS value, CASE WHEN i % 5 = 0 THEN 80.0 END AS diastolic,
           'mm[Hg]' AS unit, 'mmHg' AS unit_sent, NULL AS source,
           TIMESTAMPTZ '2026-01-01 00:00:00+00' + INTERVAL ({offset_days}) DAY
               + to_minutes(((i % {PATIENTS_PER}) * 10)::BIGINT) AS measured_at,
           60 AS utc_offset_min, now() AS received_at, now() AS loaded_at, 'm-' || i AS msg_id,
           'seg-' || (i // 6250) AS segment, (i % 6250)::INTEGER AS record_no, 0 AS item_no,
           NULL::JSON AS extra, 'run-1' AS run_id, false AS manual
    FROM range({first}, {first} + {count}) r(i)"""


def connect(path: Path):
    import duckdb

    from warehouse.db import httpfs_extension

    con = duckdb.connect(config={"memory_limit": MEMORY_LIMIT, "temp_directory": str(path.parent / "tmp")})
    con.execute(f"LOAD '{httpfs_extension()}'")
    con.execute("SET temp_file_encryption = true")
    con.execute(f"ATTACH '{path}' AS w (ENCRYPTION_KEY 'bench-readings-key-0123456789abcdef')")
    con.execute("USE w")
    return con


def classify_and_insert(con, shape: str, candidates: str) -> dict[str, float]:
    """The load's shape of work: stage the candidates, classify them against readings (LEFT JOIN on the
    key), insert what is new, commit. Seconds per part."""
    out = {}
    key = (", " + KEY_EXPR[shape].format(id="reading_id") + " AS rkey") if shape in KEY_EXPR else ""
    con.execute(f"CREATE OR REPLACE TEMP TABLE cand AS SELECT *{key} FROM ({candidates})")
    con.execute("BEGIN TRANSACTION")
    t = time.perf_counter()
    on = JOIN_ON[shape]
    con.execute(f"""CREATE OR REPLACE TEMP TABLE classified AS
                    SELECT c.*, CASE WHEN r.{on} IS NULL THEN 'load' ELSE 'duplicate' END AS fate
                    FROM cand c LEFT JOIN readings r ON r.{on} = c.{on}""")
    out["classify_s"] = time.perf_counter() - t
    t = time.perf_counter()
    cols = "reading_id, " + ("rkey, " if shape in KEY_EXPR else "")
    con.execute(f"INSERT INTO readings SELECT {cols}* EXCLUDE (reading_id{', rkey' if shape in KEY_EXPR else ''}, "
                f"fate) FROM classified WHERE fate = 'load'")
    con.execute("COMMIT")
    out["insert_commit_s"] = time.perf_counter() - t
    out["loaded"], out["duplicates"] = con.execute(
        "SELECT count(*) FILTER (fate = 'load'), count(*) FILTER (fate = 'duplicate') FROM classified").fetchone()
    return out


def block_digests(path: Path) -> list[bytes]:
    digests = []
    with path.open("rb") as f:
        while chunk := f.read(BLOCK):
            digests.append(hashlib.blake2b(chunk, digest_size=16).digest())
    return digests


def step(shape: str, path: Path, action: str, size: int, then: int) -> dict:
    """One measured step in this process (called as a child: --step)."""
    out: dict = {}
    if action == "base":  # a history of `size` readings in compacted order, checkpointed
        path.unlink(missing_ok=True)
        con = connect(path)
        con.execute(f"CREATE TABLE readings ({KEY_COLUMN[shape]} {readings_columns()})")
        con.execute("SET checkpoint_threshold = '1TB'")
        t = time.perf_counter()
        patients = max(1, size // PATIENTS_PER)
        chunk = 2_000_000
        for first in range(0, size, chunk):
            con.execute("BEGIN TRANSACTION")
            cols = "reading_id, " + ("rkey, " if shape in KEY_EXPR else "")
            key = (", " + KEY_EXPR[shape].format(id="reading_id") + " AS rkey") if shape in KEY_EXPR else ""
            con.execute(f"INSERT INTO readings SELECT {cols}* EXCLUDE (reading_id{', rkey' if key else ''}) "
                        f"FROM (SELECT *{key} FROM ({rows_sql(str(first), str(min(chunk, size - first)), str(patients), 0)}))")
            con.execute("COMMIT")
        out["insert_s"] = time.perf_counter() - t
        t = time.perf_counter()
        con.execute("CHECKPOINT")
        out["checkpoint_s"] = time.perf_counter() - t
        con.close()
    elif action == "onto":  # `size` new readings (1 % already loaded) onto the base; then its checkpoint
        con = connect(path)
        con.execute("SET checkpoint_threshold = '1TB'")  # the checkpoint is timed on its own below
        history = con.execute("SELECT count(*) FROM readings").fetchone()[0]
        patients = max(1, history // PATIENTS_PER)
        # new readings: the next ids, from 1 % of the patients over a later day (steady state) or all of them
        # (a bulk batch); every 100th is a redelivery of a loaded id
        first = history
        cands = rows_sql(str(first), str(size), str(patients), 10, dup_every=100)
        if size < history // 10:  # steady state: 1 % of patients, the last day
            cands = cands.replace(f"((i // {PATIENTS_PER}) % {patients})",
                                  f"(((i - {first}) // 50) * 97 % {patients})")
        before = block_digests(path)
        out.update(classify_and_insert(con, shape, cands))
        t = time.perf_counter()
        con.execute("CHECKPOINT")
        out["checkpoint_s"] = time.perf_counter() - t
        con.close()
        after = block_digests(path)
        out["blocks_before"] = len(before)
        out["blocks_written"] = sum(1 for i, d in enumerate(after) if i >= len(before) or before[i] != d)
        out["history"] = history
    out["maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["file_mib"] = path.stat().st_size / 2**20
    return out


def child(shape: str, path: Path, action: str, size: int, then: int) -> dict:
    proc = subprocess.run([sys.executable, "-m", "bench.readings_key", "--step", shape, str(path), action,
                           str(size), str(then)], capture_output=True, text=True, check=False)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1][:200] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--step":
        shape, path, action, size, then = sys.argv[2:7]
        print(json.dumps(step(shape, Path(path), action, int(size), int(then))))
        return
    p = parser(__doc__.splitlines()[0], 1_000_000)
    p.add_argument("--history", type=int, default=10_000_000, help="readings in the steady-state history")
    p.add_argument("--then", type=int, default=5_000, help="new readings onto the history")
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated: " + ", ".join(SHAPES))
    p.add_argument("--dir", type=Path, default=None, help="where the files go (default: a temporary folder)")
    a = p.parse_args()
    size = a.size[0] if isinstance(a.size, list) else a.size
    shapes = [s for s in a.shapes.split(",") if s]
    base = a.dir or Path(tempfile.mkdtemp(prefix="rpm-bench-key-"))
    (base / "tmp").mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": machine(), "size": size, "history": a.history, "then": a.then, "shapes": {}}
    bulk_rows, steady_rows = [], []
    for shape in shapes:
        path = base / f"{shape}.duckdb"
        r: dict = {}
        if size:
            r["bulk_base"] = child(shape, path, "base", size, 0)
            r["bulk"] = child(shape, path, "onto", size, 0)
            b = r["bulk"]
            bulk_rows.append([shape, b.get("classify_s", float("nan")), b.get("insert_commit_s", float("nan")),
                              b.get("checkpoint_s", float("nan")), b.get("maxrss_mib", float("nan")),
                              b.get("file_mib", float("nan")), b.get("error", "")])
        if a.history:
            r["history_base"] = child(shape, path, "base", a.history, 0)
            r["steady"] = child(shape, path, "onto", a.then, 0)
            h, st = r["history_base"], r["steady"]
            steady_rows.append([shape, h.get("insert_s", float("nan")), h.get("checkpoint_s", float("nan")),
                                st.get("classify_s", float("nan")), st.get("insert_commit_s", float("nan")),
                                st.get("checkpoint_s", float("nan")),
                                f"{st.get('blocks_written', '-')} of {st.get('blocks_before', '-')}",
                                st.get("maxrss_mib", float("nan")), st.get("error", h.get("error", ""))])
        path.unlink(missing_ok=True)
        results["shapes"][shape] = r
        print(f"  {shape}: {json.dumps(r)}", flush=True)
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    if bulk_rows:
        print_table(f"{size:,} new readings onto {size:,} (encrypted, {MEMORY_LIMIT} limit; load {load})",
                    ["key", "classify s", "insert + commit s", "checkpoint s", "peak MiB", "file MiB", "error"],
                    bulk_rows)
    if steady_rows:
        print_table(f"{a.then:,} new readings onto {a.history:,} (compacted order; load {load})",
                    ["key", "history insert s", "history checkpoint s", "classify s", "insert + commit s",
                     "checkpoint s", "blocks rewritten", "peak MiB", "error"], steady_rows)
    write_json(a.json, "readings_key", results)


if __name__ == "__main__":
    main()
