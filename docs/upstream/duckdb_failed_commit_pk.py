"""DuckDB 1.5.5 bug reproducer, kept for the upstream report (not part of the pipeline; see BENCHMARKS.md §2).

A COMMIT that fails with Out of Memory while the transaction's rows are merged into a VARCHAR PRIMARY KEY
index leaves those keys behind in the table's index. The table is empty (the data was rolled back), yet
inserting the same keys again fails with a false "Constraint Error: Duplicate key ... violates primary key
constraint" — on the same instance, and after a reopen once anything else was written before closing.

    .venv/bin/python docs/upstream/duckdb_failed_commit_pk.py [ROWS] [MEMORY_LIMIT] [--persist]
    defaults: 2000000 200MB  (~10 s).  The 10M / 1GB equivalent: 10000000 1GB.

--persist[-other|-checkpoint|-close]: after the failed commit, commit a small unrelated insert into the same
table, CHECKPOINT, close, reopen with a 4GB limit and insert the big key set again: shows whether the stale
keys reach the file.
--no-attempt2: skip the immediate retry on the same connection.
(-other: commit a new table instead, t untouched; -checkpoint: only CHECKPOINT; -close: just close.)
"""
import shutil
import sys
import tempfile
import time

import duckdb

args = [a for a in sys.argv[1:] if not a.startswith("--")]
rows = int(args[0]) if args else 2_000_000
mem = args[1] if len(args) > 1 else "200MB"
persist = next((a for a in sys.argv if a.startswith("--persist")), None)
d = tempfile.mkdtemp(prefix="duckdb-commit-oom-")


def connect(limit):
    con = duckdb.connect(config={"temp_directory": f"{d}/tmp", "memory_limit": limit})
    con.execute(f"ATTACH '{d}/t.duckdb' AS db")
    con.execute("USE db")
    return con


con = connect(mem)
con.execute("CREATE TABLE IF NOT EXISTS t (k VARCHAR PRIMARY KEY, v INTEGER)")
INSERT = f"INSERT INTO t SELECT md5(i::VARCHAR), i FROM range({rows}) r(i)"  # distinct 32-char keys
print("duckdb", duckdb.__version__, "rows", rows, "memory_limit", mem)


def attempt(con, label):
    t = time.monotonic()
    try:
        con.execute("BEGIN")
        con.execute(INSERT)
        con.execute("COMMIT")
        print(f"{label}: OK in {time.monotonic() - t:.1f}s")
    except duckdb.Error as e:
        print(f"{label}: {type(e).__name__}: {str(e).splitlines()[0]}  ({time.monotonic() - t:.1f}s)")
        try:
            con.execute("ROLLBACK")
        except duckdb.Error as e2:
            print("  ROLLBACK:", e2)
    print(f"  rows in t now: {con.execute('SELECT count(*) FROM t').fetchone()[0]}")


attempt(con, "attempt 1")
if "--no-attempt2" not in sys.argv:
    attempt(con, "attempt 2 (same connection)")
if persist:
    if persist == "--persist":
        con.execute("INSERT INTO t VALUES ('unrelated', -1)")
        con.execute("CHECKPOINT")
        print("committed 1 unrelated row into t + CHECKPOINT; closing")
    elif persist == "--persist-other":
        con.execute("CREATE TABLE other AS SELECT 1 AS x")
        con.execute("CHECKPOINT")
        print("committed a new table `other` (t untouched) + CHECKPOINT; closing")
    elif persist == "--persist-checkpoint":
        con.execute("CHECKPOINT")
        print("CHECKPOINT only (nothing else committed); closing")
    else:
        print("closing without anything else")
    con.close()
    con = connect("4GB")
    print(f"reopened with 4GB; rows in t: {con.execute('SELECT count(*) FROM t').fetchone()[0]}")
    attempt(con, "attempt 3 (new instance, 4GB)")
con.close()
shutil.rmtree(d, ignore_errors=True)
