"""Read-only serving snapshots: readers never block the pipeline, and the pipeline never blocks readers.

DuckDB lets one process write a file and blocks even read-only opens while it does. So writers (DAG tasks,
registry commands) publish a checkpointed copy of the encrypted clinical file — same key, still encrypted —
and clinicians' queries open the newest copy read-only. A snapshot is taken while the writer's connection
holds the file lock right after a CHECKPOINT, so it is always a committed, consistent state.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import stat
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from core import keys
from core.settings import Settings
from warehouse.db import clinical, open_clinical

KEEP = 3  # older snapshots are removed; a reader still holding one keeps its open file on Linux


def serving_dir(s: Settings) -> Path:
    return Path(s.warehouse_dir) / "serving"


def current_snapshot(s: Settings) -> Path | None:
    pointer = serving_dir(s) / "CURRENT"
    try:
        path = serving_dir(s) / pointer.read_text().strip()
    except FileNotFoundError:
        return None
    return path if path.exists() else None


def publish_snapshot(s: Settings, con: duckdb.DuckDBPyConnection | None = None) -> Path:
    """Copy the committed clinical warehouse into a new serving snapshot and make it current."""
    if con is None:
        with clinical(s) as own:
            return publish_snapshot(s, own)
    d = serving_dir(s)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    con.execute("CHECKPOINT")
    name = f"clinical-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%f')}.duckdb"
    tmp = d / f".{name}.tmp"
    for leftover in d.glob(".clinical-*.duckdb.tmp"):  # a publish that died (this one holds the writer)
        leftover.unlink(missing_ok=True)
    snapshots = _snapshots(d)
    published = _published(d)
    if len(snapshots) < KEEP or _refresh_unused(snapshots[0], tmp, s.clinical_db, _sealed_block_size(con),
                                                published.get(snapshots[0].name)) is None:
        shutil.copyfile(s.clinical_db, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
    os.replace(tmp, d / name)
    _record_published(d, {**published, name: _identity(os.stat(d / name))})
    pointer_tmp = d / ".CURRENT.tmp"
    pointer_tmp.unlink(missing_ok=True)  # written afresh, never through whatever was left at that name
    with os.fdopen(os.open(pointer_tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600), "w") as f:
        f.write(name + "\n")
    os.replace(pointer_tmp, d / "CURRENT")
    for old in _snapshots(d)[:-KEEP]:
        old.unlink(missing_ok=True)
    return d / name


# What each snapshot's file was as published (inode, size, modification and change times): the header
# comparison below trusts the old snapshot to hold what was written to it, so a file changed since (an edit, a
# restore, anything that wrote to it) is compared whole. Not synced: lost, every snapshot is compared whole.
_PUBLISHED = ".published"


def _identity(st: os.stat_result) -> list[int]:
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _published(d: Path) -> dict[str, list[int]]:
    try:
        doc = json.loads((d / _PUBLISHED).read_bytes())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _record_published(d: Path, published: dict[str, list[int]]) -> None:
    kept = {p.name for p in _snapshots(d)[-KEEP:]}
    tmp = d / f"{_PUBLISHED}.tmp"
    tmp.unlink(missing_ok=True)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600), "w") as f:
        json.dump({k: v for k, v in published.items() if k in kept}, f)
    os.replace(tmp, d / _PUBLISHED)


def _snapshots(d: Path) -> list[Path]:
    """The snapshots in ``d``, oldest first; a directory someone made there is neither reused nor removed."""
    return [p for p in sorted(d.glob("clinical-*.duckdb")) if not p.is_dir() or p.is_symlink()]


# A file's untouched blocks stay byte for byte the same from one checkpoint to the next (DuckDB writes changed
# blocks only, each encrypted on its own). So rather than copying (and syncing) the whole file, the oldest
# snapshot — two publishes old, which no reader opens any more — is brought up to date block by block, and only
# the blocks that differ are written and reach the disk (a 5,000-reading run on a 10M warehouse: ~3 % of them).
# A file some process still has open must not change under it: every DuckDB instance holds a read lock on the
# file it opened (serving()'s readers an OFD one besides: _hold), so the snapshot is refreshed only while an
# open-file-description write lock on it is granted (these conflict with every process's locks, this one's
# included), and copied otherwise.
#
# Which blocks differ is learnt from their headers, not by reading both files whole. In an encrypted file
# DuckDB (1.4+, AES-GCM) writes every block with a fresh random 12-byte nonce and the 16-byte tag at its start,
# so a block written since the old snapshot was taken has another header, and one that was not is the same
# bytes in both files: equal headers mean equal blocks (the nonce is 96 random bits per write; checked on the
# snapshots of a 10.7M warehouse, tests/unit/test_serving_snapshot.py keeps checking it). The file's own
# headers (main and the two database headers, rewritten at every checkpoint) are compared whole, and so is a
# file that is not encrypted (its block header is a 64-bit checksum only) or not laid out in whole blocks.
# A refresh is only ever built from a whole snapshot: one that died half-way is removed by the next publish.
_SYNC_BLOCK = 4 << 20
_FILE_HEADERS = 3 * 4096  # DuckDB's main header and its two alternating database headers
_BLOCK_HEADER = 32  # nonce (12) + tag (16) + padding (4); the encrypted checksum follows


def _sealed_block_size(con: duckdb.DuckDBPyConnection) -> int:
    """The clinical file's block size when its blocks are encrypted (each one sealed with its own nonce and
    tag), else 0: its changed blocks can then only be found by comparing them whole."""
    row = con.execute("""SELECT d.encrypted, s.block_size FROM duckdb_databases() d
                         JOIN pragma_database_size() s USING (database_name)
                         WHERE d.database_name = 'clinical'""").fetchone()
    return int(row[1]) if row is not None and row[0] and row[1] else 0


def _write_all(fd: int, block: bytes, offset: int) -> None:
    # A filling disk may take part of a write and say so (no error): the rest is written, or the next
    # attempt raises (ENOSPC) — a refresh never ends with a block part old, part new.
    view = memoryview(block)
    while view:
        written = os.pwrite(fd, view, offset)
        if not written:
            raise OSError(errno.ENOSPC, "no byte written")
        view, offset = view[written:], offset + written


def _sync_whole(src: int, fd: int, start: int, end: int) -> int:
    """Write what differs in [start, end) comparing the bytes; the number of bytes written."""
    written = 0
    for offset in range(start, end, _SYNC_BLOCK):
        block = os.pread(src, min(_SYNC_BLOCK, end - offset), offset)
        if os.pread(fd, len(block), offset) != block:
            _write_all(fd, block, offset)
            written += len(block)
    return written


def _sync_sealed(src: int, fd: int, block_size: int, end: int, old_end: int) -> int:
    """Write the blocks in [_FILE_HEADERS, end) whose headers differ (and every block the old file did not
    reach, which holds zeros here); the number of bytes written."""
    written = 0
    for offset in range(_FILE_HEADERS, end, block_size):
        reached = offset + block_size <= old_end
        if reached and os.pread(src, _BLOCK_HEADER, offset) == os.pread(fd, _BLOCK_HEADER, offset):
            continue
        block = os.pread(src, block_size, offset)
        _write_all(fd, block, offset)
        written += len(block)
    return written


def _refresh_unused(old: Path, tmp: Path, source: Path, block_size: int = 0,
                    published: list[int] | None = None) -> int | None:
    """Turn snapshot ``old`` into a copy of ``source`` at ``tmp``, writing only the blocks that differ (found by
    their headers when ``block_size`` says the source's blocks are sealed and ``old`` is still the file that was
    published, ``published`` its ``_identity``; else by comparing them whole); the bytes written, or None (and
    ``old`` untouched) when some process has it open."""
    try:  # never through a symlink someone planted there (O_NONBLOCK: nor wait on a FIFO)
        fd = os.open(old, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        # Only a file this process wrote: not another user's (who could rewrite what clinicians read), not one
        # with a second name elsewhere (a hard link: its other name would get the warehouse).
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
            return None
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
        except OSError:
            return None  # a reader still holds it
        os.replace(old, tmp)  # out of readers' sight before it changes
        with open(source, "rb") as f:
            src = f.fileno()
            size = os.fstat(src).st_size
            os.ftruncate(fd, size)
            if block_size > 0 and size >= _FILE_HEADERS and (size - _FILE_HEADERS) % block_size == 0 \
                    and published == _identity(st):
                written = _sync_whole(src, fd, 0, _FILE_HEADERS)
                written += _sync_sealed(src, fd, block_size, size, min(st.st_size, size))
            else:
                written = _sync_whole(src, fd, 0, size)
        os.fchmod(fd, 0o600)
        os.fsync(fd)
        return written
    finally:
        os.close(fd)  # releases the lock


# Opening a snapshot costs ~100-150 ms (a DuckDB instance, the httpfs extension for decryption, the
# attach); a query on it ~5-15 ms. A long-lived reader keeps one open instance per serving folder and hands
# out cursors on it, re-opening only when a newer snapshot is published (or a rotation rewrote the file).
_open_snapshots: dict[Path, tuple[tuple, duckdb.DuckDBPyConnection, int]] = {}
_lock = threading.Lock()


def _hold(snap: Path) -> int:
    """A descriptor holding an open-file-description read lock on ``snap``, for as long as an instance here has
    it open. DuckDB's own lock is a classic POSIX lock, which closing *any* descriptor of the file in this
    process drops (another instance of it closed, a plain read): this one stays, so a publish never reuses
    the file (_refresh_unused) under a reader here."""
    fd = os.open(snap, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_RDLCK, os.SEEK_SET, 0, 0, 0))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_held(s: Settings, snap: Path) -> tuple[duckdb.DuckDBPyConnection, int]:
    fd = _hold(snap)
    try:
        return open_clinical(s, read_only=True, db_path=snap), fd
    except BaseException:
        os.close(fd)
        raise


def _snapshot_connection(s: Settings, snap: Path) -> duckdb.DuckDBPyConnection:
    st = snap.stat()
    identity = (snap, st.st_ino, st.st_mtime_ns, keys.warehouse_key(s))
    with _lock:
        cached = _open_snapshots.get(snap.parent)
        if cached is not None and cached[0] == identity:
            return cached[1]
        con, fd = _open_held(s, snap)
        _open_snapshots[snap.parent] = (identity, con, fd)
    if cached is not None:
        cached[1].close()
        os.close(cached[2])
    return con


@contextmanager
def serving(s: Settings, private: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only connection to the newest snapshot (the clinical file itself before the first one).

    Snapshot connections are cursors on a cached instance; the live clinical file is never held open (a
    read-only open would block the writer), so before the first snapshot each call opens and closes it.
    ``private``: an instance of the caller's own, closed afterwards — for work that ATTACHes databases or
    builds large intermediates, which would otherwise stay with the shared instance."""
    snap = current_snapshot(s)
    if snap is None:  # the live file: a writer thread of this process may hold it
        with clinical(s, read_only=True) as con:
            yield con
        return
    if private:  # snapshots are only ever opened read-only: instances of them never conflict
        con, fd = _open_held(s, snap)
        try:
            yield con
        finally:
            con.close()
            os.close(fd)
        return
    cur = _snapshot_connection(s, snap).cursor()
    try:
        cur.execute("USE clinical")
        yield cur
    finally:
        cur.close()


def backups_dir(s: Settings) -> Path:
    return Path(s.home) / "backups"


def backup(s: Settings) -> Path:
    """An encrypted, consistent copy of the clinical warehouse (same key; `rpm keys rotate` re-encrypts it)."""
    d = backups_dir(s)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    with clinical(s) as con:
        con.execute("CHECKPOINT")
        target = d / f"clinical-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%f')}.duckdb"
        tmp = d / f".{target.name}.tmp"
        shutil.copyfile(s.clinical_db, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    return target
