"""Landing segments: the durable, append-only record of every message the broker delivered.

Format v2 (what ingest writes), little-endian binary::

    magic b"\x93RPMLND" | version 2 (1 byte) | u32 header length | header (compact JSON)
    block*    b"B" | u32 records | u32 body length | body
    trailer   b"T" | u32 0       | u32 body length | body          (sealed segments only)

The header holds ``rpm_landing`` (2), ``segment`` (the file's name), ``created_at``, ``encoding`` ("plain" or
"aesgcm-hkdf-v2"), ``key_id`` (the landing keyring key) and ``salt`` (16 random bytes, hex). One block is one
``flush_block()`` of the writer (ingest: one fsync group). Its plaintext holds its records column by column,
raw payload bytes included (no base64, no JSON)::

    u32 topics | u32 marks | u32 topic lengths[topics] | u32 mark lengths[marks]
    i64 received_at (UTC µs)[n] | u32 topic index[n] | u32 mark index[n] (0 = none, i = marks[i-1])
    u32 payload lengths[n] | topic bytes | mark bytes | payload bytes

so a reader turns a block into columns with a few C-level calls instead of parsing each record; topics and
marks are per-block dictionaries (a block holds few distinct ones). Encryption at rest: each segment has its
own AES-256-GCM subkey, HKDF-SHA256 of the keyring key with the header's salt and the whole header as info
(segment name, created_at and key id are bound to every block). A block body is one AES-GCM encryption with
the block index as nonce — unique because a subkey is used by one writer for one segment only — and, as
associated data, the segment name, block index, first record number and record count (the count is also in
clear so ``count_records`` needs no key): a block moved, reordered or swapped in from another segment fails
authentication. The trailer, written when sealing, is a random nonce and the AES-GCM encryption of (records,
blocks, SHA-256 over every block's tag): a segment cut at a block boundary or missing its trailer is
``truncated``. Plain segments (no keyring; tests only) have the same layout without encryption.

Readers: ``read_segment_columns(path, keyring) -> LandedColumns`` (lists ``n``, ``topic``,
``received_at_us``, ``payload``, ``mark``: one decryption per block) for the pipeline, ``read_whole_segment``
(the same as LandedRecords) and ``read_segment`` (lenient iterator: an open segment, torn tail skipped). Both
strict readers raise UnreadableSegment with a stable reason.

Format v1 (text, one base64 AES-GCM record per line) is still read until no such segment is left: a JSON
header line ``{"rpm_landing": 1, ...}`` and one line per record; re-encryption rewrites it as v2.

Life cycle: ``open/<name>.seg`` is appended and fsynced by one ingest instance; sealing writes the trailer,
fsyncs it and renames it into ``sealed/`` (atomic on one file system), after which it never changes. A crash
can leave a torn last block in an open segment: it was never fsynced, so never acked, the broker redelivers
it, and recovery drops it and writes the trailer.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import json
import os
import re
import secrets
import stat
import struct
import sys
from array import array
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from itertools import accumulate, islice
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM as _AESGCM

if TYPE_CHECKING:
    from core.keyring import Keyring

FORMAT_VERSION = 1  # the text format, still read
FORMAT_V2 = 2
SEGMENT_SUFFIX = ".seg"
PLAIN, AESGCM = "plain", "aesgcm-v1"
AESGCM_V2 = "aesgcm-hkdf-v2"
ENCODINGS = (PLAIN, AESGCM)
ENCODINGS_V2 = (PLAIN, AESGCM_V2)

MAGIC = b"\x93RPMLND"
_PREFIX = MAGIC + bytes([FORMAT_V2])
_HEAD = struct.Struct("<8sI")          # magic + version, header length
_FRAME = struct.Struct("<cII")         # kind, records, body length
_COUNTS = struct.Struct("<II")         # distinct topics, distinct marks
_AAD = struct.Struct("<QQI")           # block index, first record number, records
_TRAILER = struct.Struct("<QQ32s")     # records, blocks, SHA-256 over the block tags
_RECORD_MIN_BYTES = 20                 # of a block's plaintext: received_at, topic, mark, payload length
BLOCK, TRAILER = b"B", b"T"
TAG_BYTES = 16
SALT_BYTES = 16
_U32 = "I" if array("I").itemsize == 4 else "L"
_SWAP = sys.byteorder == "big"  # the format is little-endian; arrays are native
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
REENCRYPT_BLOCK_RECORDS = 4096


class LandedRecord(NamedTuple):  # a tuple: built once per landed message, so cheap construction matters
    n: int
    topic: str
    received_at: datetime
    payload: bytes
    mark: str | None


class LandedColumns(NamedTuple):
    """A whole segment, column by column (what the pipeline decodes)."""
    n: list[int]
    topic: list[str]
    received_at_us: list[int]  # UTC microseconds since the epoch
    payload: list[bytes]
    mark: list[str | None]


def open_dir(landing_dir: Path) -> Path:
    return landing_dir / "open"


def sealed_dir(landing_dir: Path) -> Path:
    return landing_dir / "sealed"


def utc_now() -> datetime:
    return datetime.now(UTC)


def _iso(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def to_us(ts: datetime) -> int:
    """UTC microseconds since the epoch (a naive time is taken as local, as ``astimezone`` does)."""
    if ts.tzinfo is None:
        ts = ts.astimezone(UTC)
    return (ts - _EPOCH) // _US


def from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


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
    """Messages in a landing file (v2: the clear counts of its complete blocks; v1: complete lines after the
    header); 0 for anything that is not a regular file or cannot be read (whoever reads it next says why)."""
    try:
        with open_regular(path) as f:
            if os.fstat(f.fileno()).st_size > SEGMENT_READ_MAX_BYTES:
                return 0  # no segment ingest writes: a planted sparse file of any size takes no disk
            head = f.read(_HEAD.size)
            if head[:len(_PREFIX)] == _PREFIX and len(head) == _HEAD.size:
                return _count_v2(f, _HEAD.unpack(head)[1])
            lines = head.count(b"\n")
            while chunk := f.read(1 << 20):  # chunks: a garbage file may have no newline at all
                lines += chunk.count(b"\n")
    except (NotARegularFile, OSError):
        return 0
    return max(lines - 1, 0)


def _count_v2(f: BinaryIO, header_len: int) -> int:
    size = os.fstat(f.fileno()).st_size
    off, records = _HEAD.size + header_len, 0
    while off + _FRAME.size <= size:
        f.seek(off)
        kind, count, length = _FRAME.unpack(f.read(_FRAME.size))
        off += _FRAME.size + length
        if kind != BLOCK or off > size or length < _COUNTS.size + _RECORD_MIN_BYTES * count:
            break  # the trailer, a torn tail, or a planted head claiming more records than its body holds
        records += count
    return records


def block_sizes(path: Path) -> list[int]:
    """Records per complete block of a v2 segment, from the clear block heads (no key): how ingest grouped
    its fsyncs. Empty for a v1 segment."""
    with open_regular(path) as f:
        data = f.read()
    if data[:len(_PREFIX)] != _PREFIX:
        return []
    return [count for count, _, _ in _scan_v2(data).blocks]


def _le(values: array) -> bytes:
    if _SWAP:
        values.byteswap()
    return values.tobytes()


def _encode_block(received_us: list[int], topic_ix: list[int], mark_ix: list[int], payloads: list[bytes],
                  topics: list[str], marks: list[str]) -> bytes:
    tb = [t.encode("utf-8", "surrogatepass") for t in topics]
    mb = [m.encode("utf-8", "surrogatepass") for m in marks]
    return b"".join([
        _COUNTS.pack(len(tb), len(mb)), _le(array(_U32, map(len, tb))), _le(array(_U32, map(len, mb))),
        _le(array("q", received_us)), _le(array(_U32, topic_ix)), _le(array(_U32, mark_ix)),
        _le(array(_U32, map(len, payloads))), *tb, *mb, *payloads])


def _take(kind: str, plain: bytes, off: int, count: int) -> tuple[array, int]:
    values = array(kind)
    end = off + values.itemsize * count
    values.frombytes(plain[off:end])
    if _SWAP:
        values.byteswap()
    return values, end


def _decode_block(plain: bytes, count: int) -> tuple[list[int], list[str], list[bytes], list[str | None]]:
    """A block's plaintext as columns (received_at µs, topic, payload, mark); ValueError/IndexError if its
    sizes do not add up (only a plain segment or a bug can get here: an encrypted block is authenticated)."""
    n_topics, n_marks = _COUNTS.unpack_from(plain, 0)
    if _COUNTS.size + 4 * (n_topics + n_marks) + _RECORD_MIN_BYTES * count > len(plain):
        raise ValueError("block shorter than its record count")
    topic_lens, off = _take(_U32, plain, _COUNTS.size, n_topics)
    mark_lens, off = _take(_U32, plain, off, n_marks)
    received, off = _take("q", plain, off, count)
    topic_ix, off = _take(_U32, plain, off, count)
    mark_ix, off = _take(_U32, plain, off, count)
    payload_lens, off = _take(_U32, plain, off, count)
    ends = list(accumulate(topic_lens, initial=off))
    topics = [plain[a:b].decode("utf-8", "surrogatepass") for a, b in zip(ends, ends[1:], strict=False)]
    ends = list(accumulate(mark_lens, initial=ends[-1]))
    marks: list[str | None] = [None]
    marks += [plain[a:b].decode("utf-8", "surrogatepass") for a, b in zip(ends, ends[1:], strict=False)]
    ends = list(accumulate(payload_lens, initial=ends[-1]))
    if ends[-1] != len(plain):
        raise ValueError(f"block sizes add up to {ends[-1]} bytes, not {len(plain)}")
    payloads = list(map(plain.__getitem__, map(slice, ends, islice(ends, 1, None))))
    return (received.tolist(), list(map(topics.__getitem__, topic_ix)), payloads,
            list(map(marks.__getitem__, mark_ix)))


def _nonce(block: int) -> bytes:
    return struct.pack(">4xQ", block)


def _block_aad(segment: bytes, block: int, first: int, count: int) -> bytes:
    return b"rpm-landing-v2:" + segment + b":" + _AAD.pack(block, first, count)


def _trailer_aad(segment: bytes) -> bytes:
    return b"rpm-landing-v2-trailer:" + segment


def _block_digest(body: bytes, encrypted: bool) -> bytes:
    """What the trailer's hash chain takes of a block: its tag (encrypted), or a hash of it (plain)."""
    return body[-TAG_BYTES:] if encrypted else hashlib.sha256(body).digest()


def _subkey_cipher(keyring: Keyring, kid: str, salt: bytes, header_bytes: bytes) -> _AESGCM:
    return _AESGCM(keyring.derive(kid, salt, _PREFIX + header_bytes))


def _seal_trailer(cipher: _AESGCM | None, segment: bytes, records: int, blocks: int, chain: bytes) -> bytes:
    plain = _TRAILER.pack(records, blocks, chain)
    if cipher is None:
        body = plain
    else:
        nonce = secrets.token_bytes(12)  # random: recovery may write a trailer again under the same subkey
        body = nonce + cipher.encrypt(nonce, plain, _trailer_aad(segment))
    return _FRAME.pack(TRAILER, 0, len(body)) + body


class SegmentWriter:
    """Appends records to one open segment (format v2): ``flush_block`` encrypts the pending records as one
    block and writes it, ``fsync`` makes written blocks durable (it may run on another thread meanwhile),
    ``sync`` is both, ``seal`` writes the trailer and publishes the segment."""

    def __init__(self, landing_dir: Path, name: str, now: datetime | None = None,
                 keyring: Keyring | None = None, directory: Path | None = None):
        self.landing_dir = landing_dir
        self.name = name
        self.keyring = keyring
        self.created = now or utc_now()
        open_dir(landing_dir).mkdir(parents=True, exist_ok=True)
        sealed_dir(landing_dir).mkdir(parents=True, exist_ok=True)
        self.path = (directory or open_dir(landing_dir)) / f"{name}{SEGMENT_SUFFIX}"
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        self._closed = self._broken = False
        salt = secrets.token_bytes(SALT_BYTES)
        header = {"rpm_landing": FORMAT_V2, "segment": name, "created_at": _iso(self.created),
                  "encoding": AESGCM_V2 if keyring else PLAIN, "key_id": keyring.active if keyring else None,
                  "salt": salt.hex()}
        header_bytes = json.dumps(header, separators=(",", ":")).encode()
        self._cipher = _subkey_cipher(keyring, keyring.active, salt, header_bytes) if keyring else None
        self._segment = name.encode()
        self._chain = hashlib.sha256()
        self.records = 0          # appended, pending ones included
        self.blocks = 0           # written
        self._written = 0         # records in written blocks
        self._reset_pending()
        self._file_bytes = 0
        self.bytes = 0  # in the file, plus an estimate for records not yet written (for the size-based seal)
        try:
            self._write(_HEAD.pack(_PREFIX, len(header_bytes)), header_bytes)
            _fsync_dir(self.path.parent)
        except OSError:
            self.close_unsealed()
            raise

    def _reset_pending(self) -> None:
        self._received: list[int] = []
        self._topic_ix: list[int] = []
        self._mark_ix: list[int] = []
        self._payloads: list[bytes] = []
        self._topics: dict[str, int] = {}
        self._marks: dict[str, int] = {}
        self._pending_bytes = 0

    def _write(self, *parts: bytes) -> None:
        if self._broken or self._closed:
            raise OSError(errno.EIO, f"{self.path.name}: an earlier write failed or the writer is closed")
        total = sum(map(len, parts))
        try:
            done = os.writev(self._fd, parts)
            if done < total:  # short write (disk nearly full): finish it or fail
                rest = memoryview(b"".join(parts))[done:]
                while rest:
                    rest = rest[os.write(self._fd, rest):]
        except OSError:
            self._broken = True
            raise
        self._file_bytes += total
        self.bytes = self._file_bytes + self._pending_bytes

    def append(self, topic: str, payload: bytes, received_at: datetime, mark: str | None = None) -> None:
        self.append_us(topic, payload, to_us(received_at), mark)

    def append_us(self, topic: str, payload: bytes, received_at_us: int, mark: str | None = None) -> None:
        """``append`` with the receive time already in UTC microseconds (ingest's hot path)."""
        ti = self._topics.get(topic)
        if ti is None:
            ti = self._topics[topic] = len(self._topics)
        if mark is None:
            mi = 0
        elif (mi := self._marks.get(mark, 0)) == 0:
            mi = self._marks[mark] = len(self._marks) + 1
        self._received.append(received_at_us)
        self._topic_ix.append(ti)
        self._mark_ix.append(mi)
        self._payloads.append(payload)
        self.records += 1
        self._pending_bytes += len(payload) + 20
        self.bytes += len(payload) + 20

    def flush_block(self) -> int:
        """Encrypt the pending records as one block and write it (no fsync); the number of records written."""
        count = len(self._payloads)
        if not count:
            return 0
        plain = _encode_block(self._received, self._topic_ix, self._mark_ix, self._payloads, list(self._topics),
                              list(self._marks))
        index, first = self.blocks, self._written
        self.blocks += 1  # taken before writing: a nonce is never used twice, even after a failed write
        self._reset_pending()
        if self._cipher is not None:
            body = self._cipher.encrypt(_nonce(index), plain, _block_aad(self._segment, index, first, count))
        else:
            body = plain
        self._chain.update(_block_digest(body, self._cipher is not None))
        self._written += count
        self._write(_FRAME.pack(BLOCK, count, len(body)), body)
        return count

    def fsync(self) -> None:
        """Every block written so far survives a crash from now on (safe beside ``flush_block`` on another
        thread: it covers at least what was written before it started)."""
        os.fsync(self._fd)

    def sync(self) -> None:
        """Write the pending records as a block and fsync: every record appended so far survives a crash."""
        self.flush_block()
        self.fsync()

    def finish(self) -> None:
        """Write the pending records and the trailer, fsync and close: complete, but still where it is."""
        self.flush_block()
        self._write(_seal_trailer(self._cipher, self._segment, self._written, self.blocks, self._chain.digest()))
        self.fsync()
        self.close_unsealed()

    def seal(self) -> Path:
        """Write the trailer and make the segment immutable and visible to the pipeline."""
        self.finish()
        target = sealed_dir(self.landing_dir) / self.path.name
        os.rename(self.path, target)
        _fsync_dir(sealed_dir(self.landing_dir))
        _fsync_dir(open_dir(self.landing_dir))
        return target

    def close_unsealed(self) -> None:
        """Close without writing what is pending (after a failed write: never fsynced, so never acked)."""
        if not self._closed:
            self._closed = True
            os.close(self._fd)


def _aad(segment: str, n: int) -> bytes:
    return f"rpm-landing:{segment}:{n}".encode()


class _Scan(NamedTuple):
    header: dict
    header_bytes: bytes
    blocks: list[tuple[int, int, int]]  # (records, body start, body end)
    trailer: tuple[int, int] | None     # body span
    end: int                            # after the last complete block (or the trailer)


_HEX = re.compile(r"(?:[0-9a-fA-F]{2})*")


def _scan_v2(data: bytes) -> _Scan:
    """Header and block spans of a v2 segment; ValueError if the header is not one. Stops at a torn tail."""
    if len(data) < _HEAD.size:
        raise ValueError("shorter than a landing v2 header")
    prefix, header_len = _HEAD.unpack_from(data, 0)
    if prefix != _PREFIX:
        raise ValueError(f"landing format version {prefix[len(MAGIC)]} is not supported"
                         if prefix[:len(MAGIC)] == MAGIC else "not a landing v2 segment")
    if header_len > HEADER_MAX_BYTES or _HEAD.size + header_len > len(data):
        raise ValueError("header cut short or oversized")
    header_bytes = data[_HEAD.size:_HEAD.size + header_len]
    try:
        header = json.loads(header_bytes)
    except RecursionError:  # nesting within the size limit: a ValueError like any header that does not parse
        raise ValueError("header nested too deeply") from None
    if (not isinstance(header, dict) or header.get("rpm_landing") != FORMAT_V2
            or header.get("encoding") not in ENCODINGS_V2 or not isinstance(header.get("segment"), str)
            or not isinstance(header.get("created_at"), str) or not isinstance(header.get("salt"), str)
            or not _HEX.fullmatch(header["salt"])
            or (header["encoding"] == AESGCM_V2 and not isinstance(header.get("key_id"), str))):
        raise ValueError("unsupported landing format: a header without rpm_landing 2, a known encoding, a "
                         "segment name, created_at, a hex salt and (encrypted) a key id")
    off = _HEAD.size + header_len
    blocks: list[tuple[int, int, int]] = []
    trailer = None
    while off + _FRAME.size <= len(data):
        kind, count, length = _FRAME.unpack_from(data, off)
        start, end = off + _FRAME.size, off + _FRAME.size + length
        if end > len(data) or kind not in (BLOCK, TRAILER):
            break
        off = end
        if kind == TRAILER:
            trailer = (start, end)
            break
        blocks.append((count, start, end))
    return _Scan(header, header_bytes, blocks, trailer, off)


def _v2_cipher(scan: _Scan, keyring: Keyring | None, path: Path) -> _AESGCM | None:
    if scan.header["encoding"] == PLAIN:
        return None
    if keyring is None:
        raise ValueError(f"{path.name} is encrypted: the landing keyring is needed to read it")
    return _subkey_cipher(keyring, scan.header["key_id"], bytes.fromhex(scan.header["salt"]), scan.header_bytes)


def _open_block(cipher: _AESGCM | None, data: bytes, segment: bytes, index: int, first: int,
                block: tuple[int, int, int]) -> bytes:
    from core.keyring import DecryptError

    count, start, end = block
    if cipher is None:
        return data[start:end]
    try:  # a view: the ciphertext is not copied before its one C-level decryption
        return cipher.decrypt(_nonce(index), memoryview(data)[start:end], _block_aad(segment, index, first, count))
    except InvalidTag as exc:
        raise DecryptError("authentication failed: wrong key, altered data or a block from elsewhere") from exc


def _open_trailer(cipher: _AESGCM | None, data: bytes, segment: bytes, span: tuple[int, int]
                  ) -> tuple[int, int, bytes]:
    from core.keyring import DecryptError

    body = data[span[0]:span[1]]
    if cipher is not None:
        try:
            body = cipher.decrypt(body[:12], body[12:], _trailer_aad(segment))
        except InvalidTag as exc:
            raise DecryptError("trailer authentication failed: altered, or from another segment") from exc
    if len(body) != _TRAILER.size:
        raise ValueError(f"trailer of {len(body)} bytes, not {_TRAILER.size}")
    return _TRAILER.unpack(body)


def _chain_of(scan: _Scan, data: bytes, encrypted: bool) -> bytes:
    chain = hashlib.sha256()
    for _, start, end in scan.blocks:
        chain.update(_block_digest(data[start:end], encrypted))
    return chain.digest()


def _read_prefix(path: Path) -> bytes:
    with open_regular(path) as f:
        return f.read(len(_PREFIX))


def read_header(path: Path) -> dict:
    """The segment's header (v1 or v2): ``rpm_landing``, ``segment``, ``created_at``, ``encoding``, …"""
    with open_regular(path) as f:
        head = f.read(_HEAD.size)
        if head[:len(MAGIC)] == MAGIC:
            return _scan_v2(head + f.read(HEADER_MAX_BYTES)).header
        header = json.loads(head + f.readline())
    if header.get("rpm_landing") != FORMAT_VERSION or header.get("encoding") not in ENCODINGS:
        raise ValueError(f"{path.name}: unsupported landing format {header!r}")
    return header


def read_segment(path: Path, keyring: Keyring | None = None) -> Iterator[LandedRecord]:
    """Records of a segment in order, open ones included; a torn tail (crash while writing) is skipped.

    Encrypted segments need the landing keyring; a block that fails authentication raises DecryptError, and
    so does an altered trailer. A sealed segment's completeness is checked by ``read_whole_segment`` only.
    """
    with open_regular(path) as f:
        v2 = f.read(len(_PREFIX)) == _PREFIX
        data = f.read() if v2 else b""
    if not v2:
        yield from _read_segment_v1(path, keyring)
        return
    data = _PREFIX + data
    scan = _scan_v2(data)
    cipher = _v2_cipher(scan, keyring, path)
    segment = scan.header["segment"].encode()
    first = 0
    for index, block in enumerate(scan.blocks):
        received, topics, payloads, marks = _decode_block(_open_block(cipher, data, segment, index, first, block),
                                                          block[0])
        for i in range(block[0]):
            yield LandedRecord(first + i, topics[i], from_us(received[i]), payloads[i], marks[i])
        first += block[0]
    if scan.trailer is not None:
        _open_trailer(cipher, data, segment, scan.trailer)


def _read_segment_v1(path: Path, keyring: Keyring | None) -> Iterator[LandedRecord]:
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


def recover_open_segments(landing_dir: Path, prefix: str, keyring: Keyring | None = None) -> list[Path]:
    """Seal segments an earlier run of ingest instance ``prefix`` ("*": every instance) left open, dropping
    any torn tail (v2: and writing the trailer, which needs the keyring for an encrypted one). Exact owner
    match: instance "rpm-ingest-1" never seals "rpm-ingest-1-b"'s live file. An encrypted v2 segment whose
    key the keyring lacks stays in ``open/`` (still counted there), for an operator to restore the key."""
    sealed = []
    for path in sorted(open_dir(landing_dir).glob(f"*{SEGMENT_SUFFIX}")):
        if prefix != "*" and segment_owner(path) != prefix:
            continue
        try:
            with open_regular(path, write=True) as f:
                data = f.read()
                keep = _recover_v2(f, data, keyring) if data[:len(MAGIC)] == MAGIC else _recover_v1(f, data)
        except NotARegularFile:
            continue  # not something ingest wrote: never sealed for the pipeline
        if keep is None:
            continue
        if keep == 0:  # header only: nothing was ever acked from it
            path.unlink()
            continue
        target = sealed_dir(landing_dir) / path.name
        target.parent.mkdir(exist_ok=True)
        os.rename(path, target)
        sealed.append(target)
    if sealed:
        _fsync_dir(sealed_dir(landing_dir))
    return sealed


def _recover_v1(f: BinaryIO, data: bytes) -> int:
    keep = data[: data.rfind(b"\n") + 1]
    if len(keep) != len(data):
        f.truncate(len(keep))
        os.fsync(f.fileno())
    return max(keep.count(b"\n") - 1, 0)


def _recover_v2(f: BinaryIO, data: bytes, keyring: Keyring | None) -> int | None:
    """Records kept in a v2 open segment once its torn tail is cut and its trailer written; None to leave it."""
    from core.keyring import DecryptError

    try:
        scan = _scan_v2(data)
    except ValueError:
        if len(data) > _HEAD.size and len(data) > _HEAD.size + _HEAD.unpack_from(data, 0)[1]:
            return None  # a whole header that does not parse, blocks after it: damaged since, maybe acked
        return 0  # the header itself was never completed: no block was ever fsynced or acked
    if scan.trailer is not None:  # sealed, but the rename did not happen: only what follows it is cut
        records = sum(b[0] for b in scan.blocks)
    else:
        try:
            cipher = _v2_cipher(scan, keyring, Path(scan.header["segment"]))
        except DecryptError:
            return None
        blocks = scan.blocks
        segment = scan.header["segment"].encode()
        if blocks and cipher is not None:
            # The last block may be complete in size but not in content (never fsynced): it must decrypt.
            first = sum(b[0] for b in blocks[:-1])
            try:
                _open_block(cipher, data, segment, len(blocks) - 1, first, blocks[-1])
            except DecryptError:
                blocks = blocks[:-1]
        records = sum(b[0] for b in blocks)
        if not blocks:
            return 0
        scan = scan._replace(blocks=blocks, end=blocks[-1][2])
        f.truncate(scan.end)
        f.seek(scan.end)
        f.write(_seal_trailer(cipher, segment, records, len(blocks), _chain_of(scan, data, cipher is not None)))
        f.flush()
        os.fsync(f.fileno())
        return records
    if scan.end != len(data):
        f.truncate(scan.end)
        os.fsync(f.fileno())
    return records


def list_sealed(landing_dir: Path) -> list[Path]:
    return sorted(sealed_dir(landing_dir).glob(f"*{SEGMENT_SUFFIX}"))


def segment_key_ids(path: Path) -> set[str]:
    """Ids of the keys that sealed a segment's records (empty for a plain segment)."""
    from core.keyring import Keyring

    header = read_header(path)
    if header["encoding"] == AESGCM_V2:
        return {header["key_id"]}
    if header["encoding"] != AESGCM:
        return set()
    with open_regular(path) as f:
        f.readline()
        return {Keyring.key_id_of(base64.b64decode(line)) for line in f if line.endswith(b"\n")}


def reencrypt_segment(path: Path, keyring: Keyring) -> None:
    """Rewrite a sealed segment (v1 or v2) as v2 under the keyring's active key (atomic rename; readers see
    old or new)."""
    header = read_header(path)
    cols = read_segment_columns(path, keyring)
    tmp_dir = path.parent / ".rewrite"
    tmp_dir.mkdir(exist_ok=True)
    (tmp_dir / path.name).unlink(missing_ok=True)  # left by a rewrite that died: the original is intact
    writer = SegmentWriter(path.parent.parent, header["segment"], keyring=keyring, directory=tmp_dir,
                           now=datetime.fromisoformat(header["created_at"]))
    try:
        for i in range(len(cols.n)):
            writer.append_us(cols.topic[i], cols.payload[i], cols.received_at_us[i], cols.mark[i])
            if (i + 1) % REENCRYPT_BLOCK_RECORDS == 0:
                writer.flush_block()
        writer.finish()
    finally:
        writer.close_unsealed()
    os.replace(writer.path, path)
    _fsync_dir(path.parent)


# --- the rejected area -------------------------------------------------------------------------------------
# A sealed segment that cannot be read as a whole (bad header, a block or record that does not parse, a key
# id the keyring does not hold, a block or trailer that fails authentication, blocks cut off) is *poison*:
# staging any of it would stop every run. It is moved, untouched, to ``rejected/`` with a sidecar saying why,
# so the other segments flow; an operator fixes the cause (restores a key, ...) and moves it back
# (``rpm landing replay``).
# The sidecar is written before the move: a crash in between leaves the segment in ``sealed/`` (rejected
# again next run), never a rejected segment without its reason.

REASON_SUFFIX = ".reason.json"
HEADER_MAX_BYTES = 64 * 1024
# Most a segment may hold when the pipeline reads it (whole, into memory): ingest seals at
# RPM_SEGMENT_MAX_BYTES (16 MB) plus at most one fsync group; the stage raises it with that setting.
SEGMENT_READ_MAX_BYTES = 1 << 30
BAD_HEADER, UNKNOWN_KEY, DECRYPT_FAILED, BAD_RECORD = "bad_header", "unknown_key", "decrypt_failed", "bad_record"
NOT_A_REGULAR_FILE, UNAUTHENTICATED = "not_a_regular_file", "unauthenticated"
TRUNCATED = "truncated"  # v2: blocks or the trailer cut off (a sealed segment must end with its trailer)


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
    records: int       # the messages it holds, as far as known (count_records)
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
    if _read_prefix(path)[:len(MAGIC)] != MAGIC:
        return _read_whole_v1(path, keyring)
    cols = read_segment_columns(path, keyring)
    return list(map(LandedRecord, cols.n, cols.topic, map(from_us, cols.received_at_us), cols.payload, cols.mark))


def read_segment_columns(path: Path, keyring: Keyring | None = None,
                         max_bytes: int = SEGMENT_READ_MAX_BYTES) -> LandedColumns:
    """Every record of a sealed segment as columns (one decryption per block), or UnreadableSegment naming
    why it cannot be read — the same semantics and reasons as ``read_whole_segment``. A file larger than
    ``max_bytes`` is refused unread: it is read whole, and a planted sparse file takes no disk at any size."""
    from core.keyring import DecryptError

    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise UnreadableSegment(path, BAD_RECORD, f"{size} bytes, larger than any segment ingest writes "
                                    f"({max_bytes})")
        if f.read(len(MAGIC)) != MAGIC:
            records = _read_whole_v1(path, keyring)
            return LandedColumns([r.n for r in records], [r.topic for r in records],
                                 [to_us(r.received_at) for r in records], [r.payload for r in records],
                                 [r.mark for r in records])
        f.seek(0)
        data = f.read()  # one buffer (appending the rest to the magic copied the whole file once more)
    try:
        scan = _scan_v2(data)
    except (ValueError, RecursionError) as exc:
        raise UnreadableSegment(path, BAD_HEADER, _describe(exc)) from exc
    header = scan.header
    if header["segment"] != path.stem:
        # Blocks are bound to the header's name (subkey, associated data): a copy under another name would
        # load twice.
        raise UnreadableSegment(path, BAD_HEADER, "its header names another segment than its file name")
    if keyring is not None and header["encoding"] == PLAIN:
        # Ingest writes only encrypted segments: a plain one was not written by it and is not authenticated.
        raise UnreadableSegment(path, UNAUTHENTICATED, "not encrypted: records cannot be authenticated")
    try:
        cipher = _v2_cipher(scan, keyring, path)
    except DecryptError as exc:
        raise UnreadableSegment(path, UNKNOWN_KEY, _describe(exc)) from exc
    except ValueError as exc:
        raise UnreadableSegment(path, BAD_HEADER, _describe(exc)) from exc  # a salt that is not hex
    segment = header["segment"].encode()
    received: list[int] = []
    topics: list[str] = []
    payloads: list[bytes] = []
    marks: list[str | None] = []
    for index, block in enumerate(scan.blocks):
        first = len(payloads)
        try:
            plain = _open_block(cipher, data, segment, index, first, block)
        except DecryptError as exc:
            raise UnreadableSegment(path, DECRYPT_FAILED, f"{_where(index, first, block)}: {_describe(exc)}") from exc
        try:
            r, t, p, m = _decode_block(plain, block[0])
        except (ValueError, IndexError, struct.error) as exc:
            raise UnreadableSegment(path, BAD_RECORD, f"{_where(index, first, block)}: {_describe(exc)}") from exc
        received += r
        topics += t
        payloads += p
        marks += m
    total = len(payloads)
    if scan.trailer is None:
        raise UnreadableSegment(path, TRUNCATED, f"no trailer after record {total} (block {len(scan.blocks)}): "
                                "cut short, or never sealed")
    try:
        sealed_records, sealed_blocks, chain = _open_trailer(cipher, data, segment, scan.trailer)
    except DecryptError as exc:
        raise UnreadableSegment(path, DECRYPT_FAILED, f"trailer: {_describe(exc)}") from exc
    except (ValueError, struct.error) as exc:
        raise UnreadableSegment(path, BAD_RECORD, f"trailer: {_describe(exc)}") from exc
    if (sealed_records, sealed_blocks) != (total, len(scan.blocks)):
        raise UnreadableSegment(path, TRUNCATED, f"the trailer counts {sealed_records} records in {sealed_blocks} "
                                f"blocks, the file holds {total} in {len(scan.blocks)}")
    if chain != _chain_of(scan, data, cipher is not None):
        raise UnreadableSegment(path, DECRYPT_FAILED, "its blocks are not the ones its trailer was sealed over")
    if scan.end != len(data):
        raise UnreadableSegment(path, BAD_RECORD, f"{len(data) - scan.end} bytes after the trailer")
    return LandedColumns(list(range(total)), topics, received, payloads, marks)


def _where(index: int, first: int, block: tuple[int, int, int]) -> str:
    return f"block {index} (records {first}-{first + block[0] - 1})"


def _read_whole_v1(path: Path, keyring: Keyring | None) -> list[LandedRecord]:
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
        raise UnreadableSegment(path, UNAUTHENTICATED, "not encrypted: records cannot be authenticated")
    records: list[LandedRecord] = []
    try:
        records.extend(_read_segment_v1(path, keyring))
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
