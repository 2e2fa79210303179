"""Connections to the clinical warehouse: an AES-GCM encrypted DuckDB file whose key lives outside it.

DuckDB writes encrypted files only with the OpenSSL crypto of its httpfs extension; the pinned
``duckdb-extension-httpfs`` wheel ships the signed binary, loaded from disk (no network). Temporary files
are encrypted too (``temp_file_encryption``) and kept next to the warehouse, a folder per connection, so PHI
never spills in plaintext. One process writes at a time (DuckDB's file lock), and within a process one
instance at a time may attach the file while one of them writes ("Unique file handle conflict"): the
service's threads take turns (a lock per file, held for the connection's life) and writers of other
processes are retried — either way a writer waits up to LOCK_WAIT_S instead of failing.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import os
import re
import secrets
import shutil
import threading
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


class WarehouseBusy(TimeoutError):
    """The clinical warehouse stayed held for LOCK_WAIT_S (by another process's writer, or by another thread of
    this one): nothing was read or written, and trying again later is safe."""


# One lock per database file, for this process's instances of it: DuckDB lets only one instance of a process
# attach a file that one of them attaches for writing. Re-entrant, so a thread may open the file read-only
# inside its own read-only use of it (DuckDB allows that); a nested writer still fails at once, as before.
_file_locks: dict[str, threading.RLock] = {}
_file_locks_guard = threading.Lock()


@contextmanager
def _file_turn(path: Path) -> Iterator[None]:
    """This thread's turn at a database file among this process's threads (waits up to LOCK_WAIT_S)."""
    with _file_locks_guard:
        lock = _file_locks.setdefault(os.path.realpath(path), threading.RLock())
    if not lock.acquire(timeout=LOCK_WAIT_S):
        raise WarehouseBusy(f"the clinical warehouse stayed busy with another request for {LOCK_WAIT_S:.0f} s: "
                            "try again")
    try:
        yield
    finally:
        lock.release()


@cache
def httpfs_extension() -> Path:
    import duckdb_extension_httpfs

    root = Path(duckdb_extension_httpfs.__file__).parent
    found = sorted(root.glob(f"extensions/v{duckdb.__version__}/httpfs.duckdb_extension"))
    if not found:
        raise RuntimeError(f"httpfs extension for duckdb {duckdb.__version__} not found under {root}: "
                           "install duckdb-extension-httpfs with the same version as duckdb")
    return found[0]


def definitions_dir() -> Path:
    """Idempotent definitions (tables created if missing, views and macros replaced): sql/NNN_*.sql."""
    return Path(__file__).parent / "sql"


def migrations_dir() -> Path:
    """Versioned migrations (migrations/NNN_name.sql): each changes an existing warehouse once, in order."""
    return Path(__file__).parent / "migrations"


def definitions() -> list[str]:
    return [p.read_text() for p in sorted(definitions_dir().glob("*.sql"))]


class MigrationError(RuntimeError):
    """A migration failed (nothing of it was applied), or an applied one was edited afterwards."""


SCHEMA_TABLES = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY, name VARCHAR NOT NULL, checksum VARCHAR NOT NULL, applied_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS schema_state (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL);
"""


def migrate(con: duckdb.DuckDBPyConnection, migrations: Path | None = None) -> list[str]:
    """Bring the warehouse ``con`` uses to this release's schema; returns the migrations it applied.

    Definitions (sql/) are re-applied only when their text changed since the warehouse last saw them.
    Migrations (migrations/) run once each, in version order, each in one transaction with its record in
    ``schema_migrations``; an applied migration whose file changed is an error (write a new one instead).
    Definitions run again after migrations, so a view may use a column a migration added."""
    con.execute(SCHEMA_TABLES)
    texts = definitions()
    digest = hashlib.sha256("\0".join(texts).encode()).hexdigest()
    stored = con.execute("SELECT value FROM schema_state WHERE key = 'definitions'").fetchone()
    if stored is None or stored[0] != digest:
        _apply_definitions(con, texts, digest)
    applied = dict(con.execute("SELECT version, checksum FROM schema_migrations").fetchall())
    done = []
    for path in sorted((migrations or migrations_dir()).glob("*.sql")):
        version, name = int(path.stem.split("_", 1)[0]), path.stem
        sql = path.read_text()
        checksum = hashlib.sha256(sql.encode()).hexdigest()
        if version in applied:
            if applied[version] != checksum:
                raise MigrationError(f"migration {name} was changed after this warehouse applied it: "
                                     "migrations are immutable, add a new one")
            continue
        try:
            with transaction(con):
                con.execute(sql)
                con.execute("INSERT INTO schema_migrations VALUES (?, ?, ?, now())", [version, name, checksum])
        except duckdb.Error as exc:
            raise MigrationError(f"migration {name} failed, nothing of it applied: {exc}") from exc
        done.append(name)
    if done:
        _apply_definitions(con, texts, digest)
    return done


def _apply_definitions(con: duckdb.DuckDBPyConnection, texts: list[str], digest: str) -> None:
    for sql in texts:
        con.execute(sql)
    con.execute("INSERT OR REPLACE INTO schema_state VALUES ('definitions', ?)", [digest])


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
            if "lock" not in str(exc).lower():
                raise
            if time.monotonic() > deadline:
                raise WarehouseBusy(f"the clinical warehouse stayed locked by another process (a pipeline task?) "
                                    f"for {LOCK_WAIT_S:.0f} s: try again") from exc
            time.sleep(0.1)
        except duckdb.Error:
            # A rotation that crashed after swapping the file but before promoting its key.
            staged = keys.warehouse_key_file_next(s)
            if not staged.exists():
                raise
            con.execute(f"ATTACH '{path}' AS clinical (ENCRYPTION_KEY '{keys.read_secret(staged)}'{mode})")
            os.replace(staged, s.warehouse_key_file)
            return


# A connection's spill folder: <pid>-<owner>-<connection>, <owner> naming the process's owner lock
# (<pid>-<owner>.lock beside it).
_SPILL_DIR = re.compile(r"(\d+)-([0-9a-f]{12})-[0-9a-f]{12}")
_OWNER_LOCK = re.compile(r"\d+-[0-9a-f]{12}\.lock")
_owners: dict[str, tuple[int, str, int]] = {}  # tmp folder -> (pid, token, fd holding its owner lock)
_owner_guard = threading.Lock()


def _owner_token(root: Path) -> str:
    """This process's owner token under ``root``: its lock file there is held (flock) for the process's life.

    Whether a spill folder's process is alive is asked of its lock, not of its pid: the processes sharing a
    warehouse may be in other PID namespaces (docker-compose: each container its own, all one account on
    one volume), where a live process's pid is absent or another process's here, and pids are reused."""
    key = os.path.realpath(root)
    with _owner_guard:
        owner = _owners.get(key)
        if owner is None or owner[0] != os.getpid():  # a forked child takes its own (it inherits the fd)
            token = secrets.token_hex(6)
            # Locked under a name no sweep reads, then renamed: a sweep never finds the lock free and unlinks it
            # between its creation and our flock.
            staged = root / f".{os.getpid()}-{token}.lock-new"
            fd = os.open(staged, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.rename(staged, root / f"{os.getpid()}-{token}.lock")
            except OSError:
                os.close(fd)
                staged.unlink(missing_ok=True)
                raise
            owner = _owners[key] = (os.getpid(), token, fd)
            atexit.register(_drop_owner_lock, root / f"{os.getpid()}-{token}.lock", os.getpid())
        return owner[1]


def _drop_owner_lock(lock: Path, pid: int) -> None:
    """At a clean exit the lock goes with the process, unless a folder of a connection still open needs it (a
    crash leaves it to the next sweep)."""
    if os.getpid() != pid:  # a forked child that inherited the handler
        return
    try:
        if not any(p.name.startswith(lock.stem + "-") for p in lock.parent.iterdir()):
            lock.unlink(missing_ok=True)
    except OSError:
        pass


@contextmanager
def _lock_of_dead_owner(lock: Path) -> Iterator[bool]:
    """True while this process holds ``lock`` (its owner has exited); False if a live process holds it."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        yield True  # no lock: its owner exited and a sweep already removed it
        return
    except OSError:
        yield False  # not a lock we can take (a symlink, another's file): keep what it guards
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _sweep(root: Path) -> None:
    """Remove the spill folders (and owner locks) of this account's processes that have exited."""
    def ours(e: os.DirEntry) -> bool:
        try:
            return e.stat(follow_symlinks=False).st_uid == os.getuid()
        except OSError:  # gone meanwhile (its connection closed, another sweep removed it)
            return False

    with os.scandir(root) as it:
        entries = [e for e in it if ours(e)]
    for e in entries:
        if not e.is_dir(follow_symlinks=False):
            continue
        if m := _SPILL_DIR.fullmatch(e.name):
            with _lock_of_dead_owner(root / f"{m.group(1)}-{m.group(2)}.lock") as dead:
                if dead:
                    shutil.rmtree(e.path, ignore_errors=True)
    for e in entries:
        if _OWNER_LOCK.fullmatch(e.name) and e.is_file(follow_symlinks=False):
            lock = Path(e.path)
            with _lock_of_dead_owner(lock) as dead:
                if dead and not any(p.name.startswith(lock.stem + "-") for p in root.iterdir()):
                    lock.unlink(missing_ok=True)  # held while unlinked: no sweep judges it meanwhile


def spill_dir(s: Settings) -> Path:
    """A folder for one connection's temporary files, under ``warehouse/tmp``.

    Every DuckDB instance names its spill files alike (``duckdb_temp_storage_DEFAULT-0.tmp`` ...), and one
    refuses ``temp_file_encryption`` while another's files are in its folder: in a shared folder a reader's
    open failed while a pipeline task spilled, and two spilling instances would write the same files. DuckDB
    removes the folder it created when the connection closes; those left by processes that exited are
    removed here — a process is known to have exited when its owner lock (``_owner_token``) is free.
    """
    root = Path(s.warehouse_dir) / "tmp"
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        owner = _owner_token(root)
    except OSError:
        # tmp unwritable (or not a folder): DuckDB fails only if the connection spills, as it would anyway;
        # a read that fits in memory must not fail for it. No folder of ours can appear there to be swept.
        return root / f"{os.getpid()}-{'0' * 12}-{secrets.token_hex(6)}"
    try:
        _sweep(root)
    except OSError:
        pass  # sweeping is housekeeping: an unreadable folder must not stop a read
    return root / f"{os.getpid()}-{owner}-{secrets.token_hex(6)}"


def encrypted_instance(s: Settings) -> duckdb.DuckDBPyConnection:
    """A fresh in-memory DuckDB instance ready to attach encrypted files (the clinical warehouse, a snapshot,
    the telehealth store): OpenSSL's crypto loaded, spill files encrypted in a folder of its own, and no
    progress bar (DuckDB draws it on stdout, into `--json` output and task logs)."""
    con = duckdb.connect(config={"temp_directory": str(spill_dir(s)), "memory_limit": s.warehouse_memory_limit})
    try:
        con.execute(f"LOAD '{httpfs_extension()}'")
        con.execute("SET temp_file_encryption = true")
        con.execute("SET enable_progress_bar = false")
    except BaseException:
        con.close()
        raise
    return con


def open_clinical(s: Settings, read_only: bool = False, db_path: Path | None = None) -> duckdb.DuckDBPyConnection:
    """A connection with the clinical warehouse attached (and migrated, unless read-only) as ``clinical``.

    ``db_path`` opens another file under the same key instead (a published serving snapshot). In a process
    with threads, open the clinical file through ``clinical()`` (or ``serving()``), which take the thread's
    turn at it first.
    """
    db_path = db_path or s.clinical_db
    Path(s.warehouse_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    con = encrypted_instance(s)
    try:
        if read_only and not db_path.exists():
            raise FileNotFoundError(f"no clinical warehouse at {db_path}: run `rpm pipeline run` first")
        _attach(con, s, read_only, db_path)
        con.execute("USE clinical")
        if not read_only:
            migrate(con)
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
    """A connection to the clinical warehouse for the block, this thread's turn at the file held meanwhile (two
    nurses acknowledging at the same moment: the second waits for the first instead of failing)."""
    with _file_turn(s.clinical_db):
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
