"""Landing segments: the durable, append-only record of every message the broker delivered.

A segment is a file of newline-delimited JSON. The first line is a header naming the format, its version and
the record encoding; each following line is one MQTT message::

    {"rpm_landing": 1, "segment": "...", "created_at": "...", "encoding": "plain"}
    {"n": 0, "topic": "rpm/v1/devices/bp-001/vitals", "received_at": "2026-11-27T12:00:00.123456Z",
     "payload": "<base64 of the raw bytes>", "mark": null}

Raw payload bytes are kept exactly (base64), so a decoder fixed later can re-read history. ``mark`` carries
the reason the ingest service already knows a message is malformed (it is still landed, never dropped).
Encryption at rest (``encoding: "aesgcm-v1"``, what the ingest service writes): each record line is instead
``base64(key id | nonce | AES-256-GCM(record JSON))`` with the segment name and record number as associated
data, so a record cannot be altered, moved or reordered undetected. Keys come from the landing keyring
(core.keyring), outside the landing folder. A reader refuses an encoding it does not know.

Life cycle: ``open/<name>.seg`` is appended and fsynced by one ingest instance; sealing fsyncs it and renames
it into ``sealed/`` (atomic on one file system), after which it never changes. A crash can leave a torn last
line in an open segment: that record was never acked, the broker redelivers it, and recovery drops the tail.
"""

from __future__ import annotations

import base64
import binascii
import errno
import json
import os
import re
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, NamedTuple

if TYPE_CHECKING:
    from core.keyring import Keyring

FORMAT_VERSION = 1
SEGMENT_SUFFIX = ".seg"
PLAIN, AESGCM = "plain", "aesgcm-v1"
ENCODINGS = (PLAIN, AESGCM)


class LandedRecord(NamedTuple):  # a tuple: built once per landed message, so cheap construction matters
    n: int
    topic: str
    received_at: datetime
    payload: bytes
    mark: str | None


def open_dir(landing_dir: Path) -> Path:
    return landing_dir / "open"


def sealed_dir(landing_dir: Path) -> Path:
    return landing_dir / "sealed"


def utc_now() -> datetime:
    return datetime.now(UTC)


def _iso(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_regular(path: Path, write: bool = False) -> BinaryIO:
    """A landing file opened for reading (or updating): only a regular file. Anything else an intruder or a
    mistake may put in landing — a FIFO (which would block the reader forever), a directory, a symlink (to
    /etc/shadow, say), a device — raises NotARegularFile without reading a byte or following the link."""
    try:
        fd = os.open(path, (os.O_RDWR if write else os.O_RDONLY) | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise NotARegularFile(path, "a symlink" if exc.errno == errno.ELOOP else "not a file") from None
        raise
    kind = os.fstat(fd).st_mode
    if not stat.S_ISREG(kind):
        os.close(fd)
        raise NotARegularFile(path, "a directory" if stat.S_ISDIR(kind) else "a FIFO" if stat.S_ISFIFO(kind)
                              else "a special file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "r+b" if write else "rb")


def count_records(path: Path) -> int:
    """Messages in a landing file (complete lines after the header); 0 for anything that is not a regular
    file or cannot be read (whoever reads it next says why)."""
    try:
        with open_regular(path) as f:
            lines = 0
            while chunk := f.read(1 << 20):  # chunks: a garbage file may have no newline at all
                lines += chunk.count(b"\n")
    except (NotARegularFile, OSError):
        return 0
    return max(lines - 1, 0)


class SegmentWriter:
    """Appends records to one open segment; ``sync`` makes them durable, ``seal`` publishes the segment."""

    def __init__(self, landing_dir: Path, name: str, now: datetime | None = None,
                 keyring: Keyring | None = None, directory: Path | None = None):
        self.landing_dir = landing_dir
        self.name = name
        self.keyring = keyring
        self.created = now or utc_now()
        open_dir(landing_dir).mkdir(parents=True, exist_ok=True)
        sealed_dir(landing_dir).mkdir(parents=True, exist_ok=True)
        self.path = (directory or open_dir(landing_dir)) / f"{name}{SEGMENT_SUFFIX}"
        self._f = open(self.path, "xb")  # noqa: SIM115 - lives as long as the writer
        header = {"rpm_landing": FORMAT_VERSION, "segment": name, "created_at": _iso(self.created),
                  "encoding": AESGCM if keyring else PLAIN}
        self._f.write(json.dumps(header).encode() + b"\n")
        self.records = 0
        self.bytes = self._f.tell()
        _fsync_dir(self.path.parent)

    def append(self, topic: str, payload: bytes, received_at: datetime, mark: str | None = None) -> None:
        line = json.dumps({
            "n": self.records, "topic": topic, "received_at": _iso(received_at),
            "payload": base64.b64encode(payload).decode("ascii"), "mark": mark,
        }, ensure_ascii=True).encode()
        if self.keyring is not None:
            line = base64.b64encode(self.keyring.seal(line, _aad(self.name, self.records)))
        line += b"\n"
        self._f.write(line)
        self.records += 1
        self.bytes += len(line)

    def sync(self) -> None:
        """Flush and fsync: every record appended so far survives a crash from now on."""
        self._f.flush()
        os.fsync(self._f.fileno())

    def seal(self) -> Path:
        """Make the segment immutable and visible to the pipeline."""
        self.sync()
        self._f.close()
        target = sealed_dir(self.landing_dir) / self.path.name
        os.rename(self.path, target)
        _fsync_dir(sealed_dir(self.landing_dir))
        _fsync_dir(open_dir(self.landing_dir))
        return target

    def close_unsealed(self) -> None:
        self._f.close()


def _aad(segment: str, n: int) -> bytes:
    return f"rpm-landing:{segment}:{n}".encode()


def read_header(path: Path) -> dict:
    with open_regular(path) as f:
        header = json.loads(f.readline())
    if header.get("rpm_landing") != FORMAT_VERSION or header.get("encoding") not in ENCODINGS:
        raise ValueError(f"{path.name}: unsupported landing format {header!r}")
    return header


def read_segment(path: Path, keyring: Keyring | None = None) -> Iterator[LandedRecord]:
    """Records of a segment in order; a torn final line (crash while writing) is skipped.

    Encrypted segments need the landing keyring; a record that fails authentication raises DecryptError.
    """
    header = read_header(path)
    encrypted = header["encoding"] == AESGCM
    if encrypted and keyring is None:
        raise ValueError(f"{path.name} is encrypted: the landing keyring is needed to read it")
    with open_regular(path) as f:
        f.readline()
        for n, line in enumerate(f):
            if not line.endswith(b"\n"):
                return  # torn tail: never fsynced, so never acked
            if encrypted:
                line = keyring.open(binascii.a2b_base64(line), _aad(header["segment"], n))  # type: ignore[union-attr]
            rec = json.loads(line)
            yield LandedRecord(rec["n"], rec["topic"], datetime.fromisoformat(rec["received_at"]),
                               binascii.a2b_base64(rec["payload"]), rec.get("mark"))


def segment_owner(path: Path) -> str:
    """The ingest client id that wrote a segment (names are ``<client id>-<UTC stamp>-<counter>``)."""
    return path.stem.rsplit("-", 2)[0]


def recover_open_segments(landing_dir: Path, prefix: str) -> list[Path]:
    """Seal segments an earlier run of ingest instance ``prefix`` ("*": every instance) left open, dropping
    any torn tail. Exact owner match: instance "rpm-ingest-1" never seals "rpm-ingest-1-b"'s live file."""
    sealed = []
    for path in sorted(open_dir(landing_dir).glob(f"*{SEGMENT_SUFFIX}")):
        if prefix != "*" and segment_owner(path) != prefix:
            continue
        try:
            with open_regular(path, write=True) as f:
                data = f.read()
                keep = data[: data.rfind(b"\n") + 1]
                if len(keep) != len(data):
                    f.truncate(len(keep))
                    os.fsync(f.fileno())
        except NotARegularFile:
            continue  # not something ingest wrote: never sealed for the pipeline
        if keep.count(b"\n") <= 1:  # header only: nothing was ever acked from it
            path.unlink()
            continue
        target = sealed_dir(landing_dir) / path.name
        os.rename(path, target)
        sealed.append(target)
    if sealed:
        _fsync_dir(sealed_dir(landing_dir))
    return sealed


def list_sealed(landing_dir: Path) -> list[Path]:
    return sorted(sealed_dir(landing_dir).glob(f"*{SEGMENT_SUFFIX}"))


def segment_key_ids(path: Path) -> set[str]:
    """Ids of the keys that sealed a segment's records (empty for a plain segment)."""
    from core.keyring import Keyring

    if read_header(path)["encoding"] != AESGCM:
        return set()
    with open_regular(path) as f:
        f.readline()
        return {Keyring.key_id_of(base64.b64decode(line)) for line in f if line.endswith(b"\n")}


def reencrypt_segment(path: Path, keyring: Keyring) -> None:
    """Rewrite a sealed segment under the keyring's active key (atomic rename; readers see old or new)."""
    header = read_header(path)
    records = list(read_segment(path, keyring))
    tmp_dir = path.parent / ".rewrite"
    tmp_dir.mkdir(exist_ok=True)
    (tmp_dir / path.name).unlink(missing_ok=True)  # left by a rewrite that died: the original is intact
    writer = SegmentWriter(path.parent.parent, header["segment"], keyring=keyring, directory=tmp_dir,
                           now=datetime.fromisoformat(header["created_at"]))
    for r in records:
        writer.append(r.topic, r.payload, r.received_at, r.mark)
    writer.sync()
    writer.close_unsealed()
    os.replace(writer.path, path)
    _fsync_dir(path.parent)


# --- the rejected area -------------------------------------------------------------------------------------
# A sealed segment that cannot be read as a whole (bad header, a record that is not JSON or base64, missing
# fields, a key id the keyring does not hold, a record that fails authentication) is *poison*: staging any of
# it would stop every run. It is moved, untouched, to ``rejected/`` with a sidecar saying why, so the other
# segments flow; an operator fixes the cause (restores a key, ...) and moves it back (``rpm landing replay``).
# The sidecar is written before the move: a crash in between leaves the segment in ``sealed/`` (rejected
# again next run), never a rejected segment without its reason.

REASON_SUFFIX = ".reason.json"
HEADER_MAX_BYTES = 64 * 1024
BAD_HEADER, UNKNOWN_KEY, DECRYPT_FAILED, BAD_RECORD = "bad_header", "unknown_key", "decrypt_failed", "bad_record"
NOT_A_REGULAR_FILE, UNAUTHENTICATED = "not_a_regular_file", "unauthenticated"


class UnreadableSegment(ValueError):
    """A sealed segment that cannot be read as a whole: its reason class and a message without payload values."""

    def __init__(self, path: Path, reason: str, detail: str):
        super().__init__(f"{path.name}: {reason}: {detail}")
        self.path, self.reason, self.detail = path, reason, detail


class NotARegularFile(UnreadableSegment):
    """Something in landing that is not a regular file (FIFO, directory, symlink, device)."""

    def __init__(self, path: Path, what: str):
        super().__init__(path, NOT_A_REGULAR_FILE, f"{what}, not a landing file")


class RejectedSegment(NamedTuple):
    segment: str
    reason: str
    detail: str
    records: int       # newline-terminated lines after the header: the messages it holds, as far as known
    bytes: int
    rejected_at: datetime
    origin: str        # what rejected it: a pipeline batch, a key rotation


def rejected_dir(landing_dir: Path) -> Path:
    return landing_dir / "rejected"


def _reason_path(path: Path) -> Path:
    return path.with_name(path.stem + REASON_SUFFIX)


def read_whole_segment(path: Path, keyring: Keyring | None = None) -> list[LandedRecord]:
    """Every record of a sealed segment, or UnreadableSegment naming why it cannot be read (OSError passes:
    an unreadable disk or a permission is the environment's fault, not the segment's)."""
    from core.keyring import DecryptError

    with open_regular(path) as f:
        first = f.readline(HEADER_MAX_BYTES)  # a header is ~150 bytes: a stray file is not read whole for it
    try:
        header = json.loads(first)
    except (ValueError, RecursionError) as exc:
        raise UnreadableSegment(path, BAD_HEADER, _describe(exc)) from exc
    if (not isinstance(header, dict) or header.get("rpm_landing") != FORMAT_VERSION
            or header.get("encoding") not in ENCODINGS or not isinstance(header.get("segment"), str)):
        # Named by shape only: a stray file's first line may be a payload (PHI), never copied into a reason.
        shape = (f"an object without rpm_landing {FORMAT_VERSION}, a known encoding and a segment name"
                 if isinstance(header, dict) else f"a JSON {type(header).__name__}")
        raise UnreadableSegment(path, BAD_HEADER, f"first line is {shape}, not a landing header")
    if header["segment"] != path.stem:
        # Records are bound to the header's name (associated data): a copy under another name would load twice.
        raise UnreadableSegment(path, BAD_HEADER, "its header names another segment than its file name")
    if keyring is not None and header["encoding"] == PLAIN:
        # Ingest writes only encrypted segments: a plain one was not written by it and is not authenticated.
        raise UnreadableSegment(path, UNAUTHENTICATED, "not encrypted: records cannot be authenticated")
    records: list[LandedRecord] = []
    try:
        records.extend(read_segment(path, keyring))
    except DecryptError as exc:
        reason = UNKNOWN_KEY if str(exc).startswith("unknown key id") else DECRYPT_FAILED
        raise UnreadableSegment(path, reason, f"record {len(records)}: {_describe(exc)}") from exc
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as exc:
        # what json, base64, datetime and field access raise on a malformed line (never an OSError)
        raise UnreadableSegment(path, BAD_RECORD, f"record {len(records)}: {_describe(exc)}") from exc
    return records


_LONG_QUOTE = re.compile(r"'[^']{24,}'|\"[^\"]{24,}\"")


def _describe(exc: BaseException) -> str:
    """The exception's class and message, short, with long quoted literals cut (a parser may quote the text
    it choked on, e.g. a received_at value): positions and field names, no payload values."""
    text = f"missing field {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
    return _LONG_QUOTE.sub("'…'", text)[:200]


def reject_segment(landing_dir: Path, path: Path, reason: str, detail: str = "", origin: str = "") -> RejectedSegment:
    """Move an unreadable sealed segment into ``rejected/`` with a ``<name>.reason.json`` sidecar (atomic)."""
    target_dir = rejected_dir(landing_dir)
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / path.name
    info = RejectedSegment(path.stem, reason, detail, count_records(path), path.lstat().st_size, utc_now(), origin)
    try:
        with open_regular(path) as f:
            os.fchmod(f.fileno(), 0o600)  # a planted file keeps no wider mode in rejected/
    except (NotARegularFile, OSError):
        pass
    sidecar = {"segment": info.segment, "reason": reason, "detail": detail, "records": info.records,
               "bytes": info.bytes, "rejected_at": _iso(info.rejected_at), "origin": origin}
    tmp = target_dir / f".{path.stem}{REASON_SUFFIX}.tmp"
    with open(tmp, "wb") as f:
        f.write(json.dumps(sidecar).encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, _reason_path(target))
    os.rename(path, target)
    _fsync_dir(target_dir)
    _fsync_dir(path.parent)
    return info


def list_rejected(landing_dir: Path) -> list[Path]:
    return sorted(rejected_dir(landing_dir).glob(f"*{SEGMENT_SUFFIX}"))


def rejection_of(path: Path) -> RejectedSegment:
    """What the sidecar of a rejected segment says (a segment moved there by hand has none: reason unknown)."""
    try:
        doc = json.loads(_reason_path(path).read_bytes())
        return RejectedSegment(path.stem, str(doc["reason"]), str(doc.get("detail", "")), int(doc["records"]),
                               int(doc["bytes"]), datetime.fromisoformat(doc["rejected_at"]),
                               str(doc.get("origin", "")))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        st = path.lstat()
        return RejectedSegment(path.stem, "unknown", "no readable reason file beside it", count_records(path),
                               st.st_size, datetime.fromtimestamp(st.st_mtime, UTC), "")


def restore_rejected(landing_dir: Path, name: str) -> Path:
    """Move a rejected segment back into ``sealed/`` (the next run absorbs it, or rejects it again)."""
    source = rejected_dir(landing_dir) / f"{name}{SEGMENT_SUFFIX}"
    target = sealed_dir(landing_dir) / source.name
    if not source.exists():
        raise FileNotFoundError(f"no rejected segment {name} in {rejected_dir(landing_dir)}")
    if target.exists():
        raise FileExistsError(f"{target} already exists: not overwriting it")
    sealed_dir(landing_dir).mkdir(parents=True, exist_ok=True)
    os.rename(source, target)
    _fsync_dir(sealed_dir(landing_dir))
    _reason_path(source).unlink(missing_ok=True)
    _fsync_dir(rejected_dir(landing_dir))
    return target
