"""`rpm keys rotate`: new keys for landing, warehouse and audit log; everything re-encrypted, nothing lost.

Order matters for crash safety:
- landing: every ingest instance that may write the landing folder is found (status files, owners of open
  segments); rotation refuses if one cannot be confirmed live or stopped. The new key becomes active, and
  every live instance notices the new keyring file (with or without a pid file to signal), seals its open
  segment and reports the new key; only then is every sealed segment rewritten under it (atomic rename), and
  an old key is retired only once no file uses it and every writer is confirmed on the new key;
- warehouse: the new key is saved first (staged as ``warehouse.key.next``), then a full copy is written under
  it and verified table by table (row counts), backups are re-encrypted, the copy replaces the old file and
  the staged key is promoted. A crash anywhere leaves every file under a key that is on disk (db.py tries
  the staged key; a new rotation reuses it);
- serving snapshots are re-published under the new key and old ones removed;
- the telehealth store (derived, rebuilt on every run) is rebuilt from the new snapshot under its own new key,
  staged first like the warehouse's (warehouse/telehealth.py); the pseudonym key is kept, so pseudonyms stay;
- audit log: re-sealed line by line under a new audit key (the HMAC chain is over plaintext: unchanged).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import time
from dataclasses import dataclass

import duckdb

from core import keys
from core.keyring import Keyring
from core.landing import (
    SEGMENT_SUFFIX,
    UnreadableSegment,
    list_rejected,
    list_sealed,
    open_dir,
    read_whole_segment,
    recover_open_segments,
    reencrypt_segment,
    reject_segment,
    sealed_dir,
    segment_key_ids,
    segment_owner,
)
from core.settings import Settings
from rpmctl.services import INGEST, ingest_statuses, procs
from service.accounts import Accounts
from warehouse.audit import AuditLog
from warehouse.db import clinical, open_clinical
from warehouse.serving import backups_dir, publish_snapshot, serving_dir
from warehouse.telehealth import rotate_key as rotate_telehealth_key

FRESH_S = 10.0           # an instance that wrote its status this recently is live (it writes every second)
SWITCH_TIMEOUT_S = 30.0  # how long every live instance has to report the new landing key


class RotationRefused(RuntimeError):
    """Rotation stopped before retiring or rewriting anything that a running writer might still need."""


@dataclass(frozen=True)
class Instance:
    client_id: str
    state: str          # live | stopped | unknown
    landing_key: str | None
    detail: str


def ingest_instances(s: Settings) -> list[Instance]:
    """Every ingest instance that may write this landing folder: those that report a status (pid file or not)
    and the owners of open segments. Stopped means provably gone (same host, process not alive); a stale
    status from another host, or an open segment whose writer never reported, is unknown."""
    statuses = ingest_statuses(s)
    owners = {segment_owner(p) for p in open_dir(s.landing_dir).glob(f"*{SEGMENT_SUFFIX}")}
    host, now = socket.gethostname(), time.time()
    out = []
    for cid in sorted(set(statuses) | owners):
        st = statuses.get(cid)
        if st is None:
            out.append(Instance(cid, "unknown", None, "writes landing/open/ but has never reported a status"))
            continue
        age = now - float(st.get("updated") or 0)
        where = f"pid {st.get('pid')} on {st.get('host') or '?'}, last status {age:.0f} s ago"
        if age <= FRESH_S:
            state = "live"
        elif st.get("host") == host and not _pid_alive(st.get("pid")):
            state = "stopped"
        else:
            state = "unknown"
        out.append(Instance(cid, state, st.get("landing_key"), where))
    return out


def _key_ids(path) -> set[str]:
    """Key ids a landing file uses; an unreadable file's records name none we could check."""
    try:
        return segment_key_ids(path)
    except (ValueError, OSError):
        return set()


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _refuse_unknown(instances: list[Instance], s: Settings) -> None:
    unknown = [i for i in instances if i.state == "unknown"]
    if unknown:
        names = "; ".join(f"{i.client_id} ({i.detail})" for i in unknown)
        raise RotationRefused(
            f"cannot confirm every ingest instance can switch keys: {names}. Start or stop it so it reports "
            f"(or, if it is gone for good, remove its status file in {s.run_dir}); nothing was rotated")


def rotate_landing(s: Settings) -> dict:
    """New landing key; every writer switches before anything is re-encrypted or retired."""
    _refuse_unknown(ingest_instances(s), s)
    ring = Keyring.load(s, "landing")
    marker = s.secrets_dir / "landing.rotating"  # the key an unfinished rotation added
    unfinished = keys.read_secret(marker) if marker.exists() else None
    if unfinished is not None and unfinished == ring.active:
        active = unfinished  # finish that rotation instead of adding a key per attempt
    else:
        active = ring.add_active()
        keys.write_private(marker, active.encode())
    old = set(ring.keys) - {active}
    shutil.rmtree(sealed_dir(s.landing_dir) / ".rewrite", ignore_errors=True)  # a rewrite that died mid-way
    pid = procs.read_pid(s, INGEST)
    if pid:
        os.kill(pid, signal.SIGHUP)  # sooner than its keyring poll
    # Every live instance notices the new keyring file, seals its open segment and reports the new key.
    deadline = time.monotonic() + SWITCH_TIMEOUT_S
    while True:
        instances = ingest_instances(s)
        behind = [i for i in instances if i.state != "stopped" and i.landing_key != active]
        if not behind:
            break
        if time.monotonic() > deadline:
            names = "; ".join(f"{i.client_id} ({i.state}, key {i.landing_key}, {i.detail})" for i in behind)
            raise RotationRefused(
                f"ingest did not switch to the new landing key {active} within {SWITCH_TIMEOUT_S:.0f} s: "
                f"{names}. New segments use the new key where switched; no key was retired and nothing "
                "re-encrypted: run `rpm keys rotate` again")
        time.sleep(0.05)
    for i in instances:
        if i.state == "stopped":  # its open segment was acked up to its last fsync: seal it for the pipeline
            recover_open_segments(s.landing_dir, i.client_id, ring)
    count = 0
    for path in list_sealed(s.landing_dir):
        if not _key_ids(path) - {active}:
            continue
        try:
            read_whole_segment(path, ring)
        except UnreadableSegment as exc:
            # Not ours to repair here: set it aside as the pipeline does (its next run records the row).
            reject_segment(s.landing_dir, path, exc.reason, exc.detail, origin="key rotation")
            continue
        reencrypt_segment(path, ring)
        count += 1
    # Once more, after the rewrite: an instance that started meanwhile must be on the new key as well.
    late = [i for i in ingest_instances(s) if i.state != "stopped" and i.landing_key != active]
    if late:
        raise RotationRefused(f"ingest instance(s) {', '.join(i.client_id for i in late)} appeared with an old "
                              f"key during rotation; {count} segment(s) re-encrypted, no key retired: run "
                              "`rpm keys rotate` again")
    # A rejected segment may become readable after a fix (`rpm landing replay`): its keys are kept too.
    files = [*list_sealed(s.landing_dir), *open_dir(s.landing_dir).glob(f"*{SEGMENT_SUFFIX}"),
             *list_rejected(s.landing_dir)]
    still_used = set().union(*(_key_ids(p) for p in files))
    retire = old - still_used
    ring.retire(retire)
    marker.unlink(missing_ok=True)
    return {"active": active, "segments_reencrypted": count, "retired": sorted(retire),
            "kept": sorted(old - retire), "instances": {i.client_id: i.state for i in instances}}


def rotate_warehouse(s: Settings) -> dict:
    """Re-encrypt the clinical file and its backups under a new key. The new key is on disk (staged as
    ``warehouse.key.next``) before any file is written under it, and a rotation that died is resumed with the
    same staged key, so no file is ever left under a key that exists nowhere."""
    db = s.clinical_db
    tmp = db.with_name(db.name + ".rotating")
    tmp.unlink(missing_ok=True)
    with clinical(s) as con:  # holds the write lock for the whole copy: no pipeline write can interleave
        # Opening promotes a staged key the file is already under (a rotation that died after its swap);
        # one still staged now was never used for the file, but backups may already be under it.
        next_key = keys.warehouse_key_file_next(s)
        if next_key.exists():
            new_key = keys.read_secret(next_key)
        else:
            new_key = secrets.token_hex(32)
            keys.write_private(next_key, new_key.encode())
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
        try:
            con.execute(f"ATTACH '{path}' AS old_backup (ENCRYPTION_KEY '{old_key}', READ_ONLY)")
        except duckdb.Error:
            # Already under the new key: an interrupted rotation got this far with the same staged key.
            con.execute(f"ATTACH '{path}' AS done_backup (ENCRYPTION_KEY '{new_key}', READ_ONLY)")
            con.execute("DETACH done_backup")
            continue
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
    telehealth = rotate_telehealth_key(s)  # rebuilt from the snapshot just re-published under the new key
    audit = rotate_audit(s)
    accounts = Accounts(s).rotate_key()
    verify = AuditLog(s).verify()
    if not verify["ok"]:
        raise RuntimeError(f"audit log does not verify after rotation: {verify['problem']}")
    return {"landing": landing, "warehouse": warehouse, "telehealth": telehealth, "audit": audit,
            "accounts": accounts, "retired": landing["retired"], "audit_chain": "verified"}

