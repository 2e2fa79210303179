"""A failed COMMIT must leave the warehouse exactly as it was — including its primary-key indexes.

DuckDB 1.5.5 keeps the keys of a transaction whose COMMIT failed (out of memory) in the table's index and
would write them to the file at close; the rows themselves are gone. Every later load of those readings would
then be refused as a duplicate, forever (docs/upstream/duckdb_failed_commit_pk.py). ``transaction()`` must
not let that reach the file: after the failure, a reopened warehouse loads the same rows.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from warehouse.db import transaction

ROWS = 300_000  # distinct 32-character keys: too many for the index merge at a 30 MB limit
INSERT = f"INSERT INTO t SELECT md5(i::VARCHAR), i FROM range({ROWS}) r(i)"


def _connect(path: Path, memory_limit: str) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(config={"temp_directory": str(path.parent / "tmp"), "memory_limit": memory_limit})
    con.execute(f"ATTACH '{path}' AS db")
    con.execute("USE db")
    return con


def test_rows_of_a_failed_commit_can_be_loaded_after_reopening(tmp_path: Path) -> None:
    path = tmp_path / "w.duckdb"
    con = _connect(path, "30MB")
    con.execute("CREATE TABLE t (k VARCHAR PRIMARY KEY, v INTEGER)")
    con.execute("INSERT INTO t VALUES ('earlier', -1)")  # committed work before: the close would checkpoint

    with pytest.raises(duckdb.Error, match="(?i)commit"), transaction(con):
        con.execute(INSERT)
    con.close()

    con = _connect(path, "1GB")
    assert con.execute("SELECT count(*) FROM t").fetchone() == (1,)  # the failed rows are gone...
    with transaction(con):
        con.execute(INSERT)                                        # ...and can be loaded: no false duplicate
    assert con.execute("SELECT count(*), count(DISTINCT k) FROM t").fetchone() == (ROWS + 1, ROWS + 1)
    con.close()
