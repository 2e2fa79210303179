"""Connections to the clinical warehouse: an AES-GCM encrypted DuckDB file whose key lives outside it.

DuckDB writes encrypted files only with the OpenSSL crypto of its httpfs extension; the pinned
``duckdb-extension-httpfs`` wheel ships the signed binary, loaded from disk (no network). Temporary files
are encrypted too (``temp_file_encryption``) and kept next to the warehouse, so PHI never spills in plaintext.
One process writes at a time (DuckDB's file lock): writers retry briefly instead of failing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import duckdb

from core import keys
from core.settings import Settings

LOCK_WAIT_S = 60.0


@cache
def httpfs_extension() -> Path:
    import duckdb_extension_httpfs

    root = Path(duckdb_extension_httpfs.__file__).parent
    found = sorted(root.glob(f"extensions/v{duckdb.__version__}/httpfs.duckdb_extension"))
    if not found:
        raise RuntimeError(f"httpfs extension for duckdb {duckdb.__version__} not found under {root}: "
                           "install duckdb-extension-httpfs with the same version as duckdb")
    return found[0]


def migrations() -> list[str]:
    return [p.read_text() for p in sorted((Path(__file__).parent / "sql").glob("*.sql"))]


def _attach(con: duckdb.DuckDBPyConnection, s: Settings, read_only: bool, db_path: Path) -> None:
    key = keys.warehouse_key(s)
    path = str(db_path).replace("'", "''")
    mode = ", READ_ONLY" if read_only else ""
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            con.execute(f"ATTACH '{path}' AS clinical (ENCRYPTION_KEY '{key}'{mode})")
            return
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                raise
            time.sleep(0.1)
        except duckdb.Error:
            # A rotation that crashed after swapping the file but before promoting its key.
            staged = keys.warehouse_key_file_next(s)
            if not staged.exists():
                raise
            con.execute(f"ATTACH '{path}' AS clinical (ENCRYPTION_KEY '{staged.read_text().strip()}'{mode})")
            os.replace(staged, s.warehouse_key_file)
            return


def open_clinical(s: Settings, read_only: bool = False, db_path: Path | None = None) -> duckdb.DuckDBPyConnection:
    """A connection with the clinical warehouse attached (and migrated, unless read-only) as ``clinical``.

    ``db_path`` opens another file under the same key instead (a published serving snapshot).
    """
    db_path = db_path or s.clinical_db
    Path(s.warehouse_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = Path(s.warehouse_dir) / "tmp"
    con = duckdb.connect(config={"temp_directory": str(tmp), "memory_limit": s.warehouse_memory_limit})
    try:
        con.execute(f"LOAD '{httpfs_extension()}'")
        con.execute("SET temp_file_encryption = true")
        if read_only and not db_path.exists():
            raise FileNotFoundError(f"no clinical warehouse at {db_path}: run `rpm pipeline run` first")
        _attach(con, s, read_only, db_path)
        con.execute("USE clinical")
        if not read_only:
            for sql in migrations():
                con.execute(sql)
    except BaseException:
        con.close()
        raise
    return con


def one_row(cur: duckdb.DuckDBPyConnection) -> tuple[Any, ...]:
    """The row of an executed query that always returns one (an aggregate): never None."""
    row = cur.fetchone()
    if row is None:
        raise LookupError("the query returned no row where one was expected")
    return row


def rows(cur: duckdb.DuckDBPyConnection) -> list[dict]:
    """The result of an executed query as a list of {column: value} dicts."""
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


@contextmanager
def clinical(s: Settings, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
    con = open_clinical(s, read_only)
    try:
        yield con
    finally:
        con.close()


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """All or nothing: a task that dies inside leaves the warehouse as it was. After a failed COMMIT the
    connection must be closed, not reused (``clinical()`` does)."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    try:
        con.execute("COMMIT")
    except duckdb.Error:
        # DuckDB 1.5.5: a COMMIT that fails (out of memory) leaves its rows' keys in the primary-key indexes
        # in memory, and the checkpoint at close would write them to the file — every later insert of those
        # rows would then fail as a false duplicate (docs/upstream/duckdb_failed_commit_pk.py). Close without
        # that checkpoint: the next open rebuilds from the committed state.
        con.execute("PRAGMA disable_checkpoint_on_shutdown")
        raise
