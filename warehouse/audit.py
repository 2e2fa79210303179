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

Every append also authenticates the chain *before* the tail — a record deleted, edited or swapped in the middle
refuses the read just as a truncated tail does — at a cost that does not grow with the log: each process
remembers how far it has verified each log file (its inode, the offset, the chain's last record there and a
SHA-256 of the bytes up to it) and afterwards authenticates only the records appended since. Its own appends
move that mark without reading anything; when the file changed in another way (another process appended, or
someone edited it in place) the verified prefix is hashed again and compared (~50 ms for 100,000 records),
and a file that is not a strict extension of it is walked from the start. The mark is also kept, under the
MAC key, in ``audit.verified``, so a new process does not walk the whole chain again either. Tampering once
found stays found: the process refuses every later append until it is restarted after an investigation.

What an append waits for: the record and the new head (to its temp file) are both written before either is
synced, so the two syncs mostly share one journal commit instead of waiting for one each (on a shared disk a
commit carries other writers' data: the record, head and anchor synced one after the other took 21/43 ms
p50/p95 at load 8-11); only then is the head renamed into place. So the states a crash can leave are exactly
those of the writes in a row: the head names the new record only once the record is durable (a log one record
past its head is the crash case rolled forward above; a log shorter than its head is still a truncation), and
the temp file is never read. The anchor is written after the head without a sync of its own: it is a tripwire
for a rollback, not a record, and what a crash can do to it — leave an older copy (older than the head is
accepted) or, on a file system that commits a rename before the data, an empty file — is no more than
deleting it, which a missing anchor already is (an older installation); the next append writes it again.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, TypedDict

from core.identity import caller_name
from core.keyring import DecryptError, Keyring
from core.keys import read_secret, write_private
from core.settings import Settings

GENESIS = "0" * 64
# The verified prefix is hashed again at least this often even when the file's size and times say nothing
# changed since (an in-place edit of the same length within one tick of the file system's clock).
REHASH_EVERY_S = 60.0
# A process records its verified mark in audit.verified once it has verified this much more than the mark
# there says (each new process then hashes the prefix and authenticates only the records after it).
PERSIST_EVERY_BYTES = 1 << 20
_CHUNK = 1 << 20


class _Head(TypedDict):
    """The head file's claim: the last record's sequence number and MAC."""

    seq: int
    mac: str


class AuditTampered(RuntimeError):
    """The log does not match its authenticated head (or the head is missing or forged): nothing can be
    appended, so every read of PHI that must be audited is refused until someone investigates."""


@dataclass
class _Verified:
    """How far this process has authenticated one audit log file."""

    file: tuple[int, int]          # st_dev, st_ino: a rewritten file (key rotation, an editor) is another one
    offset: int                    # where the authenticated lines end
    seq: int                       # the last authenticated record (-1: none)
    mac: str                       # its MAC (GENESIS: none)
    digest: str                    # SHA-256 of the file's bytes before ``offset``
    hasher: Any                    # that hash, to be continued (None for a mark read from audit.verified)
    times: tuple[int, int, int]    # size, mtime_ns, ctime_ns when last verified or appended to by us
    hashed_at: float               # time.monotonic() of the last hash of the prefix
    persisted: int                 # the offset audit.verified holds (-1: none of ours)


class _Walk(NamedTuple):
    """What authenticating a run of lines found."""

    records: int                   # records authenticated before the first problem
    mac: str                       # the last one's MAC (the chain's state)
    before: str                    # the MAC before it
    end: int                       # bytes of the authenticated lines (each with its newline)
    problem: str | None


# Per process, by log path: the verified mark, and the tampering found (sticky until the process restarts).
_verified: dict[Path, _Verified] = {}
_tampered: dict[Path, str] = {}
_state_lock = threading.Lock()  # the service's threads share the marks


def _found_earlier(problem: str) -> str:
    return (f"{problem} (found earlier by this process, which serves no PHI until it is restarted after an "
            "investigation)")


def _times(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


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
        self.verified_path = self.dir / "audit.verified"
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

    def _head_doc(self, seq: int, mac: str) -> bytes:
        return json.dumps({"seq": seq, "mac": mac, "head_mac": self._head_mac(seq, mac)}).encode()

    def _write_head(self, seq: int, mac: str) -> None:
        """Head and anchor, each synced (the genesis head and a crash rolled forward: rare, kept simple)."""
        write_private(self.head_path, self._head_doc(seq, mac))
        self._write_anchor(seq, mac)

    def _write_anchor(self, seq: int, mac: str, durable: bool = True) -> None:
        doc = json.dumps({"seq": seq, "mac": mac, "anchor_mac": self._mac(f"anchor:{seq}:{mac}".encode())}).encode()
        if durable:
            write_private(self.anchor_path, doc)
            return
        tmp, fd = _staged(self.anchor_path, doc)
        os.close(fd)
        os.replace(tmp, self.anchor_path)

    def _anchor_seq(self) -> int | None:
        """The newest record the anchor has seen (None if there is no anchor yet: an older installation)."""
        try:
            text = read_secret(self.anchor_path)
            if not text.strip("\x00"):
                # What a crash can leave of an anchor written without a sync (see the module's docstring):
                # no more than a removed one.
                return None
            doc = json.loads(text)
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

    def check(self) -> str | None:
        """None when the log authenticates — its chain up to the end (incrementally: what this process has not
        verified yet) and its last record against the authenticated head (or one crash-interrupted append past
        it, which the next append completes); else what is wrong. Cheap enough for every registry change;
        `rpm ops status` runs the full ``verify``."""
        with self._locked(fcntl.LOCK_SH):
            try:
                self._check(persist=False)
            except AuditTampered as exc:
                return str(exc)
        return None

    def _check(self, persist: bool) -> tuple[dict, dict | None, int, int]:
        """The head and ``_tail``'s answer, once the chain up to the tail authenticates; AuditTampered (kept for
        the life of this process) otherwise. Call with the file lock held."""
        with _state_lock:
            found = _tampered.get(self.path)
            if found is not None:
                raise AuditTampered(_found_earlier(found))
            try:
                self._verify_chain(persist)
                head = self._head()
                return (head, *self._tail(head))
            except AuditTampered as exc:
                _tampered[self.path] = str(exc)
                raise

    def _verify_chain(self, persist: bool) -> None:
        """Authenticate the log's complete lines from the start, reading again only what changed since this
        process (or the mark in audit.verified) last verified it. Raises AuditTampered."""
        try:
            f = open(self.path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            _verified.pop(self.path, None)  # ``_tail`` judges a missing log against the head
            return
        with f:
            st = os.fstat(f.fileno())
            file, now = (st.st_dev, st.st_ino), time.monotonic()
            mark = _verified.get(self.path)
            if mark is not None and mark.file == file and mark.times == _times(st) \
                    and now - mark.hashed_at < REHASH_EVERY_S:
                return  # not written to since we verified it (or appended to it ourselves)
            if mark is None or mark.file != file or mark.offset > st.st_size:
                mark = self._load_mark(file, st.st_size)
            hasher, seq, mac, offset, persisted = hashlib.sha256(), -1, GENESIS, 0, -1
            if mark is not None and _hash_prefix(f, mark.offset, hasher) == mark.digest:
                # The file still starts with what was verified: only what follows is authenticated.
                seq, mac, offset, persisted = mark.seq, mark.mac, mark.offset, mark.persisted
            else:
                hasher = hashlib.sha256()
                f.seek(0)
            pending = b""
            while chunk := f.read(4 * _CHUNK):
                pending += chunk
                walk = self._walk(pending, seq, mac, GENESIS)
                if walk.problem is not None:
                    _verified.pop(self.path, None)
                    raise AuditTampered(walk.problem)
                hasher.update(pending[:walk.end])
                seq, mac, offset, pending = seq + walk.records, walk.mac, offset + walk.end, pending[walk.end:]
        # (What is left in ``pending`` is a line without its newline: ``_tail`` judges it.)
        mark = _Verified(file, offset, seq, mac, hasher.hexdigest(), hasher, _times(st), now, persisted)
        _verified[self.path] = mark
        if persist:
            self._persist_mark(mark)

    def _mark_mac(self, file: tuple[int, int], offset: int, seq: int, mac: str, digest: str) -> str:
        return self._mac(f"verified:{file[0]}:{file[1]}:{offset}:{seq}:{mac}:{digest}".encode())

    def _load_mark(self, file: tuple[int, int], size: int) -> _Verified | None:
        """The mark another process left in audit.verified, if it authenticates and is about this file."""
        try:
            doc = json.loads(self.verified_path.read_bytes())
            offset, seq, mac, digest = int(doc["offset"]), int(doc["seq"]), str(doc["mac"]), str(doc["sha256"])
            marked = (int(doc["dev"]), int(doc["ino"]))
            authentic = hmac.compare_digest(str(doc["mark_mac"]), self._mark_mac(marked, offset, seq, mac, digest))
        except (OSError, ValueError, KeyError, TypeError):
            return None  # no mark (or a damaged one): the chain is walked from the start
        if not authentic or marked != file or offset > size:
            return None
        return _Verified(file, offset, seq, mac, digest, None, (-1, -1, -1), 0.0, offset)

    def _persist_mark(self, mark: _Verified) -> None:
        if mark.offset - mark.persisted < PERSIST_EVERY_BYTES and mark.persisted >= 0:
            return
        doc = {"dev": mark.file[0], "ino": mark.file[1], "offset": mark.offset, "seq": mark.seq, "mac": mark.mac,
               "sha256": mark.digest,
               "mark_mac": self._mark_mac(mark.file, mark.offset, mark.seq, mark.mac, mark.digest)}
        try:
            write_private(self.verified_path, json.dumps(doc).encode())
        except OSError:
            return  # only a shortcut for the next process: it walks more
        mark.persisted = mark.offset

    def _walk(self, data: bytes, seq: int, prev: str, before: str) -> _Walk:
        """Authenticate the complete lines of ``data`` as the records after ``seq``, whose MAC is ``prev``."""
        pos = count = 0
        while (nl := data.find(b"\n", pos)) >= 0:
            mac, problem = self._authenticate(data[pos:nl], seq + count + 1, prev)
            if mac is None:
                return _Walk(count, prev, before, pos, problem)
            before, prev, count, pos = prev, mac, count + 1, nl + 1
        return _Walk(count, prev, before, pos, None)

    def _authenticate(self, line: bytes, seq: int, prev: str) -> tuple[str | None, str | None]:
        """(the MAC of record ``seq`` held by ``line``, None) if it decrypts as that record and follows ``prev``;
        else (None, what is wrong)."""
        try:
            sealed = base64.b64decode(line, validate=True)
            if Keyring.key_id_of(sealed) not in self.keyring.keys:  # rotated by another process since we loaded
                self.keyring = Keyring.load(self._settings, "audit")
            record = json.loads(self.keyring.open(sealed, f"audit:{seq}".encode()))
            if not isinstance(record, dict):
                raise ValueError("not a record")
        except (DecryptError, ValueError) as exc:
            return None, (f"line {seq + 1}: cannot be authenticated (edited, inserted, reordered or not ours): "
                          f"{exc}")
        mac = record.pop("mac", None)
        if record.get("seq") != seq:
            return None, (f"line {seq + 1}: sequence {record.get('seq')} where {seq} was expected (a record was "
                          "deleted or reordered)")
        if record.get("prev") != prev:
            return None, f"record {seq}: does not follow record {seq - 1} (chain broken)"
        if not isinstance(mac, str) or not hmac.compare_digest(self._mac(_canonical(record)), mac):
            return None, f"record {seq}: MAC mismatch (edited)"
        return mac, None

    def append(self, actor: str, action: str, patient_ids: list[str], query: dict, rows: int,
               outcome: str = "ok") -> dict:
        """Record one access; returns the record (fsynced before this returns).

        Raises AuditTampered, writing nothing, when the log does not authenticate (``check``): a read of PHI
        that cannot be audited must not be served."""
        with self._locked():
            head, ahead, end, size = self._check(persist=True)
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
            line = base64.b64encode(self.keyring.seal(_canonical(record), f"audit:{record['seq']}".encode())) + b"\n"
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "ab") as f:
                f.write(line)
                f.flush()
                head_tmp, head_fd = _staged(self.head_path, self._head_doc(record["seq"], record["mac"]))
                try:  # both written before either sync: the second finds the journal mostly committed
                    os.fsync(f.fileno())
                    os.fsync(head_fd)
                finally:
                    os.close(head_fd)
                self._appended(os.fstat(f.fileno()), line, record)
            os.replace(head_tmp, self.head_path)  # only now, with the record it names durable
            self._write_anchor(record["seq"], record["mac"], durable=False)
        return record

    def _appended(self, st: os.stat_result, line: bytes, record: dict) -> None:
        """Move this process's mark past the record it has just written (nothing to read again)."""
        with _state_lock:
            mark = _verified.get(self.path)
            if mark is None or mark.hasher is None or mark.file != (st.st_dev, st.st_ino) \
                    or mark.offset + len(line) != st.st_size or mark.seq + 1 != record["seq"]:
                _verified.pop(self.path, None)  # the next check walks what it has not seen
                return
            mark.hasher.update(line)
            mark.offset, mark.seq, mark.mac, mark.times = st.st_size, record["seq"], record["mac"], _times(st)
            mark.digest = mark.hasher.hexdigest()
            self._persist_mark(mark)

    def _read_raw(self) -> tuple[bytes | None, bytes]:
        """The raw head and the log's bytes, read together, with no append in between."""
        with self._locked(fcntl.LOCK_SH):
            return self._read_locked()

    def _read_locked(self) -> tuple[bytes | None, bytes]:
        try:
            head_raw: bytes | None = self.head_path.read_bytes()
        except FileNotFoundError:
            head_raw = None
        return head_raw, self.path.read_bytes() if self.path.exists() else b""

    def _read(self) -> tuple[bytes | None, list[bytes], bool]:
        """The raw head, the log's complete lines and whether a torn line (no newline) follows them."""
        head_raw, data = self._read_raw()
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
        """Walk the whole chain; ``ok`` is False with the first problem found (and this process then refuses
        to append, like ``check``) — or with the one this process found earlier, if it did."""
        result = self._verify()
        with _state_lock:
            if not result["ok"]:
                _tampered.setdefault(self.path, result["problem"])
            elif self.path in _tampered:
                result = {"ok": False, "records": result["records"],
                          "problem": _found_earlier(_tampered[self.path])}
        return result

    def _verify(self) -> dict:
        # The anchor too is read under the lock: read after it, an append in between makes it newer than the
        # head read here, which looks exactly like a rollback.
        with self._locked(fcntl.LOCK_SH):
            head_raw, data = self._read_locked()
            try:
                anchored, anchor_problem = self._anchor_seq(), None
            except AuditTampered as exc:
                anchored, anchor_problem = None, str(exc)
        torn = bool(data) and not data.endswith(b"\n")
        walk = self._walk(data, -1, GENESIS, GENESIS)
        count, prev = walk.records, walk.mac
        if walk.problem is not None:
            return {"ok": False, "records": count, "problem": walk.problem}
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
        if count and head == {"seq": count - 2, "mac": walk.before} and not torn:
            # One record past the head: an append died between its two writes (the next one rolls it forward).
            head = {"seq": count - 1, "mac": prev}
        if head["seq"] != count - 1 or head["mac"] != prev:
            where = f"ends at record {count - 1}" if count else "holds no record"
            return {"ok": False, "records": count,
                    "problem": f"log {where} but the head says {head['seq']} (records were removed from the end)"}
        if anchor_problem is not None:
            return {"ok": False, "records": count, "problem": anchor_problem}
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
            with _state_lock:
                _verified.pop(self.path, None)  # another file now: the next check walks it once
        return len(out)


def _staged(path: Path, data: bytes) -> tuple[Path, int]:
    """``data`` written, not yet synced, to the owner-only temp file ``write_private`` would use for ``path``
    (never through a planted file or link): (the temp path, its open descriptor) for the caller to sync and
    rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        raise
    return tmp, fd


def _hash_prefix(f: Any, size: int, hasher: Any) -> str | None:
    """The SHA-256 of the first ``size`` bytes of ``f`` (fed into ``hasher``), None if the file is shorter."""
    f.seek(0)
    left = size
    while left:
        chunk = f.read(min(_CHUNK, left))
        if not chunk:
            return None
        hasher.update(chunk)
        left -= len(chunk)
    return str(hasher.hexdigest())


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
