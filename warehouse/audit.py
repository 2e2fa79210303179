"""The PHI access audit log: append-only, encrypted, and tamper-evident.

Every read of patient data appends one record: who, when, which patient(s), what was asked, how many rows.
Records form an HMAC-SHA256 chain (each carries the previous record's MAC; the MAC key is a secret outside
the log), and each line is AES-GCM sealed with its sequence number as associated data. A separate head file
holds the last sequence number and MAC under its own MAC. ``verify`` therefore detects an edited, deleted,
inserted or reordered record and a truncated tail. (Restoring an old copy of *both* the log and its head is
only detectable against an external anchor: ship ``rpm audit verify --json``'s head to another system.)
"""

from __future__ import annotations

import base64
import fcntl
import getpass
import hashlib
import hmac
import json
import os
import secrets
from datetime import UTC, datetime
from pathlib import Path

from rpmctl.crypto import DecryptError, Keyring
from rpmctl.keys import write_private
from rpmctl.settings import Settings

GENESIS = "0" * 64


def _canonical(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), default=str).encode()


class AuditLog:
    def __init__(self, s: Settings):
        self.dir = Path(s.home) / "audit"  # type: ignore[arg-type]
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = self.dir / "audit.log"
        self.head_path = self.dir / "audit.head"
        self.keyring = Keyring.load(s, "audit")
        mac_path = Path(s.secrets_dir) / "audit.mac.key"  # type: ignore[arg-type]
        if not mac_path.exists():
            write_private(mac_path, secrets.token_hex(32).encode())
        self._mac_key = bytes.fromhex(mac_path.read_text().strip())

    def _mac(self, data: bytes) -> str:
        return hmac.new(self._mac_key, data, hashlib.sha256).hexdigest()

    def _head_mac(self, seq: int, mac: str) -> str:
        return self._mac(f"head:{seq}:{mac}".encode())

    def _read_head(self) -> dict:
        try:
            return json.loads(self.head_path.read_text())
        except FileNotFoundError:
            return {"seq": -1, "mac": GENESIS, "head_mac": self._head_mac(-1, GENESIS)}

    def append(self, actor: str, action: str, patient_ids: list[str], query: dict, rows: int,
               outcome: str = "ok") -> dict:
        """Record one access; returns the record (fsynced before this returns)."""
        lock = os.open(self.dir / ".audit.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            # Chain from the log itself, not the head: if a crash hit between the two writes, the next
            # append still continues the chain, and rewriting the head repairs it.
            head = self._last_record()
            record = {
                "seq": head["seq"] + 1, "ts": datetime.now(UTC).isoformat(timespec="microseconds"),
                "actor": actor, "os_user": getpass.getuser(), "action": action,
                "patients": sorted(patient_ids), "query": query, "rows": rows, "outcome": outcome,
                "prev": head["mac"],
            }
            record["mac"] = self._mac(_canonical(record))
            sealed = self.keyring.seal(_canonical(record), f"audit:{record['seq']}".encode())
            with open(self.path, "ab") as f:
                f.write(base64.b64encode(sealed) + b"\n")
                f.flush()
                os.fsync(f.fileno())
            new_head = {"seq": record["seq"], "mac": record["mac"],
                        "head_mac": self._head_mac(record["seq"], record["mac"])}
            write_private(self.head_path, json.dumps(new_head).encode())
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            os.close(lock)
        return record

    def _last_record(self) -> dict:
        """seq and MAC of the newest record (its position is its sequence number, authenticated as AAD).

        Reads only the file's tail: the head names the last seq, or one less if a crash hit between the log
        and head writes; the AAD check proves which. Anything else (head missing or altered) counts lines."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return {"seq": -1, "mac": GENESIS}
        last = _tail_line(self.path)
        seq_in_head = self._read_head().get("seq", -1)
        for seq in (seq_in_head, seq_in_head + 1):
            if seq >= 0:
                try:
                    rec = json.loads(self.keyring.open(base64.b64decode(last), f"audit:{seq}".encode()))
                    return {"seq": rec["seq"], "mac": rec["mac"]}
                except (DecryptError, ValueError):
                    pass
        seq = self.path.read_bytes().count(b"\n") - 1
        rec = json.loads(self.keyring.open(base64.b64decode(last), f"audit:{seq}".encode()))
        return {"seq": rec["seq"], "mac": rec["mac"]}

    def records(self) -> list[dict]:
        """Every record, decrypted (raises DecryptError on an altered line)."""
        if not self.path.exists():
            return []
        out = []
        for seq, line in enumerate(self.path.read_bytes().splitlines()):
            out.append(json.loads(self.keyring.open(base64.b64decode(line), f"audit:{seq}".encode())))
        return out

    def verify(self) -> dict:
        """Walk the chain; ``ok`` is False with the first problem found."""
        prev, count = GENESIS, 0
        lines = self.path.read_bytes().splitlines() if self.path.exists() else []
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
        head = self._read_head()
        if not hmac.compare_digest(head.get("head_mac", ""), self._head_mac(head.get("seq", -2), head.get("mac", ""))):
            return {"ok": False, "records": count, "problem": "head file was altered"}
        if head["seq"] != count - 1 or head["mac"] != prev:
            return {"ok": False, "records": count,
                    "problem": f"log ends at record {count - 1} but the head says {head['seq']} "
                               "(records were removed from the end)"}
        return {"ok": True, "records": count, "problem": None, "head": {"seq": head["seq"], "mac": head["mac"]}}

    def reencrypt(self) -> int:
        """Re-seal every line under the audit keyring's active key (for `rpm keys rotate`)."""
        lock = os.open(self.dir / ".audit.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            lines = self.path.read_bytes().splitlines() if self.path.exists() else []
            out = []
            for seq, line in enumerate(lines):
                aad = f"audit:{seq}".encode()
                out.append(base64.b64encode(self.keyring.seal(self.keyring.open(base64.b64decode(line), aad),
                                                              aad)))
            write_private(self.path, b"".join(line + b"\n" for line in out))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            os.close(lock)
        return len(out)


def _tail_line(path: Path, window: int = 8192) -> bytes:
    """The last complete line of a file, reading only its end (the audit log grows with every read of PHI)."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        while True:
            start = max(0, size - window)
            f.seek(start)
            lines = f.read().rstrip(b"\n").split(b"\n")
            if len(lines) > 1 or start == 0:
                return lines[-1]
            window *= 2
