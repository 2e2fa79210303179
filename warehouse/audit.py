"""The PHI access audit log: append-only, encrypted, and tamper-evident.

Every read of patient data appends one record: who, when, which patient(s), what was asked, how many rows.
Records form an HMAC-SHA256 chain (each carries the previous record's MAC; the MAC key is a secret outside
the log), and each line is AES-GCM sealed with its sequence number as associated data. A separate head file
holds the last sequence number and MAC under its own MAC; it exists from the moment the MAC key does.
``verify`` therefore detects an edited, deleted, inserted or reordered record and a truncated tail.

The chain is anchored at the head: ``append`` continues only from the authenticated head, and refuses
(``AuditTampered``, nothing written) when the log's tail does not match it — so truncating or emptying the
log stays detectable however many reads follow, instead of being "repaired" by the next one. Two tails are
legitimate besides the head itself, both left by a crash: one authenticated record past the head (the log
was written, the head not yet: the head is rolled forward) and a torn line without its newline beyond the
head (a write that never completed, so no read was served: it is dropped).
(Restoring an old copy of *both* the log and its head is only detectable against an external anchor: ship
``rpm audit verify --json``'s head to another system.)
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TypedDict

from core.identity import caller_name
from core.keyring import DecryptError, Keyring
from core.keys import read_secret, write_private
from core.settings import Settings

GENESIS = "0" * 64


class _Head(TypedDict):
    """The head file's claim: the last record's sequence number and MAC."""

    seq: int
    mac: str


class AuditTampered(RuntimeError):
    """The log does not match its authenticated head (or the head is missing or forged): nothing can be
    appended, so every read of PHI that must be audited is refused until someone investigates."""


def _canonical(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), default=str).encode()


def os_user() -> str:
    """The account that ran this command, from the kernel (an environment variable such as LOGNAME is the
    caller's to set, so it proves nothing): root when root started a command that then became the service
    account."""
    return caller_name()


class AuditLog:
    def __init__(self, s: Settings):
        self.dir = Path(s.home) / "audit"
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.dir.stat().st_mode & 0o077:  # made wider by an older version
            os.chmod(self.dir, 0o700)
        self.path = self.dir / "audit.log"
        self.head_path = self.dir / "audit.head"
        # A second copy of the head outside the audit folder: restoring an older copy of both the log and its
        # head (a rollback that hides the newest reads) no longer matches it.
        self.anchor_path = Path(s.secrets_dir) / "audit.anchor"
        self._settings = s
        self.keyring = Keyring.load(s, "audit")
        self._mac_key = self._load_mac_key(Path(s.secrets_dir) / "audit.mac.key")

    @contextmanager
    def _locked(self, kind: int = fcntl.LOCK_EX) -> Iterator[None]:
        lock = os.open(self.dir / ".audit.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, kind)
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            os.close(lock)

    def _load_mac_key(self, path: Path) -> bytes:
        if not path.exists():
            with self._locked():
                if not path.exists():
                    self._mac_key = secrets.token_bytes(32)
                    if not (self.path.exists() and self.path.stat().st_size):
                        # The genesis head is written before the key: a crash in between leaves no key, and the
                        # next start writes both again. Once the key exists, a missing head means it was removed.
                        self._write_head(-1, GENESIS)
                    # (A key lost while the log holds records: the old head no longer authenticates.)
                    write_private(path, self._mac_key.hex().encode())
        return bytes.fromhex(read_secret(path))

    def _mac(self, data: bytes) -> str:
        return hmac.new(self._mac_key, data, hashlib.sha256).hexdigest()

    def _head_mac(self, seq: int, mac: str) -> str:
        return self._mac(f"head:{seq}:{mac}".encode())

    def _write_head(self, seq: int, mac: str) -> None:
        write_private(self.head_path, json.dumps({"seq": seq, "mac": mac,
                                                  "head_mac": self._head_mac(seq, mac)}).encode())
        write_private(self.anchor_path, json.dumps({"seq": seq, "mac": mac,
                                                    "anchor_mac": self._mac(f"anchor:{seq}:{mac}".encode())}).encode())

    def _anchor_seq(self) -> int | None:
        """The newest record the anchor has seen (None if there is no anchor yet: an older installation)."""
        try:
            doc = json.loads(read_secret(self.anchor_path))
            seq, mac, anchor_mac = int(doc["seq"]), str(doc["mac"]), str(doc["anchor_mac"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            raise AuditTampered("the anchor (secrets/audit.anchor) is unreadable (altered)") from None
        if not hmac.compare_digest(anchor_mac, self._mac(f"anchor:{seq}:{mac}".encode())):
            raise AuditTampered("the anchor (secrets/audit.anchor) was altered")
        return seq

    def _head(self) -> dict:
        """The authenticated head ({seq, mac}); AuditTampered if it is missing, unreadable or forged."""
        try:
            doc = json.loads(self.head_path.read_bytes())
            seq, mac, head_mac = int(doc["seq"]), str(doc["mac"]), str(doc["head_mac"])
        except FileNotFoundError:
            raise AuditTampered("the head file is missing (removed?)") from None
        except (ValueError, KeyError, TypeError):
            raise AuditTampered("the head file is unreadable (altered)") from None
        if not hmac.compare_digest(head_mac, self._head_mac(seq, mac)):
            raise AuditTampered("head file was altered")
        anchored = self._anchor_seq()
        if anchored is not None and anchored > seq:
            raise AuditTampered(f"the log and its head were rolled back: the anchor has seen record {anchored}, "
                                f"the head ends at {seq}")
        return {"seq": seq, "mac": mac}

    def _open(self, line: bytes, seq: int) -> dict | None:
        """The record a line holds if it authenticates as record ``seq`` (AAD and chain MAC), else None."""
        if seq < 0:
            return None
        try:
            sealed = base64.b64decode(line, validate=True)
            if Keyring.key_id_of(sealed) not in self.keyring.keys:  # rotated by another process since we loaded
                self.keyring = Keyring.load(self._settings, "audit")
            record = json.loads(self.keyring.open(sealed, f"audit:{seq}".encode()))
        except (DecryptError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("seq") != seq or not isinstance(record.get("mac"), str):
            return None
        body = {k: v for k, v in record.items() if k != "mac"}
        return record if hmac.compare_digest(self._mac(_canonical(body)), record["mac"]) else None

    def _tail(self, head: dict) -> tuple[dict | None, int, int]:
        """Check the log's end against ``head`` reading only its last line: (the record one past the head when
        a crash hit between the log and head writes, else None; where complete lines end; file size).
        Raises AuditTampered for any other tail."""
        line, end, size = _last_line(self.path)
        if end < size and line is not None and self._open(line, head["seq"] + 1) is not None:
            # A torn write after a record the head never got to: no legitimate sequence of appends leaves this
            # (the head is rolled forward before the next record is written).
            raise AuditTampered(f"unfinished data after record {head['seq'] + 1}, which the head does not name")
        if line is None:
            if head["seq"] == -1:
                return None, end, size
            raise AuditTampered(f"the log holds no record but the head says it ends at record {head['seq']} "
                                "(the log was emptied or replaced)")
        record = self._open(line, head["seq"])
        if record is not None and hmac.compare_digest(record["mac"], head["mac"]):
            return None, end, size
        ahead = self._open(line, head["seq"] + 1)
        if ahead is not None and end == size and hmac.compare_digest(str(ahead.get("prev")), head["mac"]):
            return ahead, end, size
        raise AuditTampered(f"the log does not end at record {head['seq']}, where its head says it ends "
                            "(records were removed from, or added to, the end)")

    def check_tail(self) -> str | None:
        """None when the log's last record is the one its authenticated head names (or one crash-interrupted
        append past it, which the next append completes); else what is wrong. Reads the head and the last
        line only, so `rpm ops status` can call it on every check."""
        with self._locked(fcntl.LOCK_SH):
            try:
                self._tail(self._head())
            except AuditTampered as exc:
                return str(exc)
        return None

    def append(self, actor: str, action: str, patient_ids: list[str], query: dict, rows: int,
               outcome: str = "ok") -> dict:
        """Record one access; returns the record (fsynced before this returns).

        Raises AuditTampered, writing nothing, when the log's tail does not match its authenticated head: a
        read of PHI that cannot be audited must not be served."""
        with self._locked():
            head = self._head()
            ahead, end, size = self._tail(head)
            if ahead is not None:  # the previous append died between its two writes: finish it
                head = {"seq": ahead["seq"], "mac": ahead["mac"]}
                self._write_head(head["seq"], head["mac"])
            elif end < size:  # a torn line past the head: that append never returned, so nothing was served
                with open(self.path, "r+b") as f:
                    f.truncate(end)
                    os.fsync(f.fileno())
            record = {
                "seq": head["seq"] + 1, "ts": datetime.now(UTC).isoformat(timespec="microseconds"),
                "actor": actor, "os_user": os_user(), "action": action,
                "patients": sorted(patient_ids), "query": query, "rows": rows, "outcome": outcome,
                "prev": head["mac"],
            }
            record["mac"] = self._mac(_canonical(record))
            sealed = self.keyring.seal(_canonical(record), f"audit:{record['seq']}".encode())
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "ab") as f:
                f.write(base64.b64encode(sealed) + b"\n")
                f.flush()
                os.fsync(f.fileno())
            self._write_head(record["seq"], record["mac"])
        return record

    def _read(self) -> tuple[bytes | None, list[bytes], bool]:
        """The raw head, the log's complete lines and whether a torn line (no newline) follows them — read
        together, with no append in between."""
        with self._locked(fcntl.LOCK_SH):
            try:
                head_raw: bytes | None = self.head_path.read_bytes()
            except FileNotFoundError:
                head_raw = None
            data = self.path.read_bytes() if self.path.exists() else b""
        return head_raw, data.split(b"\n")[:-1], bool(data) and not data.endswith(b"\n")

    def records(self) -> list[dict]:
        """Every record, decrypted (raises DecryptError on an altered line)."""
        out = []
        for seq, line in enumerate(self._read()[1]):
            out.append(json.loads(self.keyring.open(base64.b64decode(line), f"audit:{seq}".encode())))
        return out

    def readable_records(self) -> list[dict]:
        """Every record that still decrypts; an altered line becomes ``{"seq": n, "unreadable": reason}``
        (for the auditor's view, which shows the verdict of ``verify`` beside them)."""
        out: list[dict] = []
        for seq, line in enumerate(self._read()[1]):
            try:
                out.append(json.loads(self.keyring.open(base64.b64decode(line), f"audit:{seq}".encode())))
            except (DecryptError, ValueError) as exc:
                out.append({"seq": seq, "unreadable": str(exc)})
        return out

    def verify(self) -> dict:
        """Walk the chain; ``ok`` is False with the first problem found."""
        head_raw, lines, torn = self._read()
        macs, prev, count = [GENESIS], GENESIS, 0
        for seq, line in enumerate(lines):
            try:
                record = json.loads(self.keyring.open(base64.b64decode(line), f"audit:{seq}".encode()))
            except (DecryptError, ValueError) as exc:
                return {"ok": False, "records": count, "problem": f"line {seq + 1}: cannot be authenticated "
                        f"(edited, inserted, reordered or not ours): {exc}"}
            mac = record.pop("mac", None)
            if record.get("seq") != seq:
                return {"ok": False, "records": count, "problem": f"line {seq + 1}: sequence {record.get('seq')}"
                        f" where {seq} was expected (a record was deleted or reordered)"}
            if record.get("prev") != prev:
                return {"ok": False, "records": count,
                        "problem": f"record {seq}: does not follow record {seq - 1} (chain broken)"}
            if not hmac.compare_digest(self._mac(_canonical(record)), mac or ""):
                return {"ok": False, "records": count, "problem": f"record {seq}: MAC mismatch (edited)"}
            prev, count = mac, count + 1
            macs.append(mac)
        if head_raw is None:
            return {"ok": False, "records": count, "problem": "the head file is missing (removed?)"}
        try:
            doc = json.loads(head_raw)
            head: _Head = {"seq": int(doc["seq"]), "mac": str(doc["mac"])}
            head_mac = str(doc["head_mac"])
        except (ValueError, KeyError, TypeError):
            return {"ok": False, "records": count, "problem": "the head file is unreadable (altered)"}
        if not hmac.compare_digest(head_mac, self._head_mac(head["seq"], head["mac"])):
            return {"ok": False, "records": count, "problem": "head file was altered"}
        if count and head == {"seq": count - 2, "mac": macs[-2]} and not torn:
            # One record past the head: an append died between its two writes (the next one rolls it forward).
            head = {"seq": count - 1, "mac": prev}
        if head["seq"] != count - 1 or head["mac"] != prev:
            where = f"ends at record {count - 1}" if count else "holds no record"
            return {"ok": False, "records": count,
                    "problem": f"log {where} but the head says {head['seq']} (records were removed from the end)"}
        try:
            anchored = self._anchor_seq()
        except AuditTampered as exc:
            return {"ok": False, "records": count, "problem": str(exc)}
        if anchored is not None and anchored > head["seq"]:
            return {"ok": False, "records": count,
                    "problem": f"the log and its head were rolled back to record {head['seq']}: the anchor "
                               f"(secrets/audit.anchor) has seen record {anchored}"}
        # A torn line past the head is an append that never completed (and served nothing): not a record.
        return {"ok": True, "records": count, "problem": None, "head": head}

    def reencrypt(self) -> int:
        """Re-seal every line under the audit keyring's active key (for `rpm keys rotate`)."""
        with self._locked():
            data = self.path.read_bytes() if self.path.exists() else b""
            out = []
            for seq, line in enumerate(data.split(b"\n")[:-1]):  # a torn last line is no record
                aad = f"audit:{seq}".encode()
                out.append(base64.b64encode(self.keyring.seal(self.keyring.open(base64.b64decode(line), aad),
                                                              aad)))
            write_private(self.path, b"".join(line + b"\n" for line in out))
        return len(out)


def _last_line(path: Path, window: int = 8192) -> tuple[bytes | None, int, int]:
    """(the last complete line or None, the offset where complete lines end, the file size), reading only the
    file's end (the audit log grows with every read of PHI)."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return None, 0, 0
    with f:
        size = f.seek(0, os.SEEK_END)
        while True:
            start = max(0, size - window)
            f.seek(start)
            data = f.read(size - start)
            last_nl = data.rfind(b"\n")
            prev_nl = data.rfind(b"\n", 0, last_nl) if last_nl > 0 else -1
            if start == 0 or prev_nl >= 0:
                if last_nl < 0:
                    return None, 0, size
                return data[prev_nl + 1:last_nl], start + last_nl + 1, size
            window *= 2
