"""`rpm keys rotate`: new keys for landing, warehouse and audit log; everything re-encrypted, nothing lost.

Order matters for crash safety:
- landing: the new key becomes active first (ingest seals its open segment and reloads on SIGHUP), every
  sealed segment is rewritten under it (atomic rename), and an old key is retired only once no file uses it;
- warehouse: a full copy is written under the new key and verified table by table (row counts) before it
  replaces the old file; the new key is staged as ``warehouse.key.next`` and promoted after the swap, so a
  crash between the two still opens (db.py tries the staged key);
- serving snapshots are re-published under the new key and old ones removed;
- audit log: re-sealed line by line under a new audit key (the HMAC chain is over plaintext: unchanged).
"""

from __future__ import annotations

import os
import secrets
import signal
import time

from ingest.landing import (
    SEGMENT_SUFFIX,
    list_sealed,
    open_dir,
    recover_open_segments,
    reencrypt_segment,
    segment_key_ids,
)
from rpmctl import keys, procs
from rpmctl.crypto import Keyring
from rpmctl.services import INGEST, ingest_status
from rpmctl.settings import Settings
from warehouse.audit import AuditLog
from warehouse.db import clinical, open_clinical
from warehouse.serving import backups_dir, publish_snapshot, serving_dir


def rotate_landing(s: Settings) -> dict:
    ring = Keyring.load(s, "landing")
    old = set(ring.keys)
    active = ring.add_active()
    pid = procs.read_pid(s, INGEST)
    if pid:
        os.kill(pid, signal.SIGHUP)  # seal the open segment, reload the keyring
        deadline = time.monotonic() + 30
        while (ingest_status(s) or {}).get("landing_key") != active:
            if time.monotonic() > deadline:
                raise RuntimeError("ingest did not reload the landing keyring within 30s; old keys kept")
            time.sleep(0.05)
    else:
        # Nobody is writing: seal what a stopped ingest left open so it is re-encrypted too.
        recover_open_segments(s.landing_dir, "*")  # type: ignore[arg-type]
    count = 0
    for path in list_sealed(s.landing_dir):  # type: ignore[arg-type]
        if segment_key_ids(path) - {active}:
            reencrypt_segment(path, ring)
            count += 1
    still_used = set().union(*(segment_key_ids(p) for p in list_sealed(s.landing_dir)),  # type: ignore[arg-type]
                             *(segment_key_ids(p) for p in open_dir(s.landing_dir).glob(f"*{SEGMENT_SUFFIX}")))  # type: ignore[arg-type]
    retire = old - still_used
    ring.retire(retire)
    return {"active": active, "segments_reencrypted": count, "retired": sorted(retire),
            "kept": sorted(old - retire)}


def rotate_warehouse(s: Settings) -> dict:
    new_key = secrets.token_hex(32)
    db = s.clinical_db
    tmp = db.with_name(db.name + ".rotating")
    tmp.unlink(missing_ok=True)
    with clinical(s) as con:  # holds the write lock for the whole copy: no pipeline write can interleave
        con.execute("CHECKPOINT")
        con.execute(f"ATTACH '{tmp}' AS rotated (ENCRYPTION_KEY '{new_key}')")
        con.execute("COPY FROM DATABASE clinical TO rotated")
        tables = [r[0] for r in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = 'clinical' ORDER BY 1").fetchall()]
        rows = 0
        for t in tables:
            before = con.execute(f'SELECT count(*) FROM clinical."{t}"').fetchone()[0]  # type: ignore[index]
            after = con.execute(f'SELECT count(*) FROM rotated."{t}"').fetchone()[0]  # type: ignore[index]
            if before != after:
                raise RuntimeError(f"rotation copy of {t} has {after} rows, expected {before}: aborted")
            rows += before
        con.execute("CHECKPOINT rotated")
        con.execute("DETACH rotated")
        backups = _reencrypt_backups(s, con, keys.warehouse_key(s), new_key)
        next_key = keys.warehouse_key_file_next(s)
        keys.write_private(next_key, new_key.encode())
        os.replace(tmp, db)
        os.replace(next_key, s.warehouse_key_file)
    # Snapshots under the old key are replaced; readers holding one keep their open file.
    old = sorted(serving_dir(s).glob("clinical-*.duckdb"))
    with clinical(s) as con:
        publish_snapshot(s, con)
    for path in old:
        path.unlink(missing_ok=True)
    # Prove the new file opens with the new key only.
    open_clinical(s, read_only=True).close()
    return {"tables": len(tables), "rows": rows, "backups": backups}


def _reencrypt_backups(s: Settings, con, old_key: str, new_key: str) -> int:
    """Every backup re-written under the new key (verified by row counts) before the old key is dropped."""
    count = 0
    for path in sorted(backups_dir(s).glob("clinical-*.duckdb")):
        tmp = path.with_name(f".{path.name}.rotating")
        tmp.unlink(missing_ok=True)
        con.execute(f"ATTACH '{path}' AS old_backup (ENCRYPTION_KEY '{old_key}', READ_ONLY)")
        con.execute(f"ATTACH '{tmp}' AS new_backup (ENCRYPTION_KEY '{new_key}')")
        con.execute("COPY FROM DATABASE old_backup TO new_backup")
        for (t,) in con.execute("SELECT table_name FROM duckdb_tables() WHERE database_name = 'old_backup'"
                                ).fetchall():
            a = con.execute(f'SELECT count(*) FROM old_backup."{t}"').fetchone()
            b = con.execute(f'SELECT count(*) FROM new_backup."{t}"').fetchone()
            if a != b:
                raise RuntimeError(f"backup {path.name}: {t} copied {b} rows of {a}: rotation aborted")
        con.execute("CHECKPOINT new_backup")
        con.execute("DETACH new_backup")
        con.execute("DETACH old_backup")
        os.replace(tmp, path)
        count += 1
    return count


def rotate_audit(s: Settings) -> dict:
    log = AuditLog(s)
    old = set(log.keyring.keys)
    log.keyring.add_active()
    n = log.reencrypt()
    log.keyring.retire(old)
    return {"records": n, "active": log.keyring.active}


def rotate_all(s: Settings) -> dict:
    landing = rotate_landing(s)
    warehouse = rotate_warehouse(s)
    audit = rotate_audit(s)
    verify = AuditLog(s).verify()
    if not verify["ok"]:
        raise RuntimeError(f"audit log does not verify after rotation: {verify['problem']}")
    return {"landing": landing, "warehouse": warehouse, "audit": audit,
            "retired": landing["retired"], "audit_chain": "verified"}

