"""Landing segments: every delivered message kept byte for byte, sealed atomically, recoverable after a crash."""

from __future__ import annotations

import base64
import json
import struct
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from core.keyring import DecryptError, Keyring
from core.landing import (
    SEGMENT_SUFFIX,
    SegmentWriter,
    list_sealed,
    open_dir,
    read_header,
    read_segment,
    recover_open_segments,
    reencrypt_segment,
    sealed_dir,
    segment_key_ids,
)
from core.settings import Settings

T0 = datetime(2026, 11, 27, 12, 0, 0, 123456, tzinfo=UTC)
MESSAGES = [
    ("rpm/v1/devices/bp-001/vitals", b'{"metric": "heart_rate", "value": 72}', T0, None),
    ("rpm/v1/devices/bp-001/vitals", b"\xff\xfe\x00 not utf-8 \x80\n\r", T0 + timedelta(microseconds=1), None),
    ("rpm/v1/devices/+/vitals", b"", T0 + timedelta(seconds=1), "unknown_topic"),
    ("rpm/v1/devices/bp-002/vitals", bytes(range(256)),
     datetime(2026, 11, 27, 7, 0, 2, tzinfo=timezone(timedelta(hours=-5))), None),
]


def _write(landing: Path, name: str, messages=MESSAGES) -> SegmentWriter:
    w = SegmentWriter(landing, name, now=T0)
    for topic, payload, received_at, mark in messages:
        w.append(topic, payload, received_at, mark)
    return w


def test_round_trip_preserves_bytes_topic_received_at_and_mark(tmp_path: Path) -> None:
    sealed = _write(tmp_path, "ingest-1-20261127T120000000000-000001").seal()
    assert sealed == sealed_dir(tmp_path) / f"ingest-1-20261127T120000000000-000001{SEGMENT_SUFFIX}"
    records = list(read_segment(sealed))
    assert [r.n for r in records] == [0, 1, 2, 3]
    assert [r.topic for r in records] == [m[0] for m in MESSAGES]
    assert [r.payload for r in records] == [m[1] for m in MESSAGES]
    assert [r.received_at for r in records] == [m[2] for m in MESSAGES]  # same instants, to the microsecond
    assert all(r.received_at.utcoffset() == timedelta(0) for r in records)
    assert [r.mark for r in records] == [m[3] for m in MESSAGES]


def test_sealing_moves_the_segment_out_of_open(tmp_path: Path) -> None:
    w = _write(tmp_path, "ingest-1-20261127T120000000000-000001")
    assert w.path.exists() and list_sealed(tmp_path) == []
    sealed = w.seal()
    assert not w.path.exists()
    assert list_sealed(tmp_path) == [sealed]
    assert list(open_dir(tmp_path).iterdir()) == []


def test_header_names_format_and_encoding(tmp_path: Path) -> None:
    sealed = _write(tmp_path, "ingest-1-20261127T120000000000-000001").seal()
    assert sealed.read_bytes()[:8] == b"\x93RPMLND\x02"  # binary: a text tool never mistakes it for JSON lines
    header = read_header(sealed)
    assert len(bytes.fromhex(header.pop("salt"))) == 16
    assert header == {"rpm_landing": 2, "segment": "ingest-1-20261127T120000000000-000001",
                      "created_at": "2026-11-27T12:00:00.123456Z", "encoding": "plain", "key_id": None}


def test_writer_never_overwrites_an_existing_segment(tmp_path: Path) -> None:
    _write(tmp_path, "ingest-1-20261127T120000000000-000001").close_unsealed()
    with pytest.raises(FileExistsError):
        SegmentWriter(tmp_path, "ingest-1-20261127T120000000000-000001")


# A block cut short by a crash: its frame announces more bytes than the file holds.
TORN_BLOCK = struct.pack("<cII", b"B", 5, 4000) + b"\x17" * 100


def test_torn_final_block_is_skipped(tmp_path: Path) -> None:
    w = _write(tmp_path, "ingest-1-20261127T120000000000-000001")
    w.sync()
    w.close_unsealed()
    with open(w.path, "ab") as f:
        f.write(TORN_BLOCK)
    records = list(read_segment(w.path))
    assert [r.n for r in records] == [0, 1, 2, 3]


def test_recover_seals_an_open_segment_and_truncates_its_torn_tail(tmp_path: Path) -> None:
    w = _write(tmp_path, "ingest-1-20261127T120000000000-000001")
    w.sync()
    w.close_unsealed()
    intact = w.path.read_bytes()
    with open(w.path, "ab") as f:
        f.write(TORN_BLOCK)  # crash mid-write

    recovered = recover_open_segments(tmp_path, "ingest-1")

    assert recovered == [sealed_dir(tmp_path) / w.path.name]
    assert recovered[0].read_bytes().startswith(intact)  # every fsynced block kept as it was, then the trailer
    assert [r.payload for r in read_segment(recovered[0])] == [m[1] for m in MESSAGES]
    assert not w.path.exists()


def test_recover_deletes_a_header_only_segment(tmp_path: Path) -> None:
    empty = SegmentWriter(tmp_path, "ingest-1-20261127T120000000000-000002")
    empty.close_unsealed()
    torn = SegmentWriter(tmp_path, "ingest-1-20261127T120000000000-000003")
    torn.close_unsealed()
    with open(torn.path, "ab") as f:
        f.write(TORN_BLOCK)  # the only block never completed: nothing was acked

    assert recover_open_segments(tmp_path, "ingest-1") == []
    assert list(open_dir(tmp_path).iterdir()) == []
    assert list_sealed(tmp_path) == []


def test_recover_only_touches_its_own_instance_segments(tmp_path: Path) -> None:
    mine = _write(tmp_path, "ingest-1-20261127T120000000000-000001")
    mine.sync()
    mine.close_unsealed()
    other = _write(tmp_path, "ingest-2-000001")
    other.sync()
    other.close_unsealed()

    assert recover_open_segments(tmp_path, "ingest-1") == [sealed_dir(tmp_path) / mine.path.name]
    assert other.path.exists()


def _split_header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (length,) = struct.unpack_from("<I", data, 8)
    return json.loads(data[12:12 + length]), data[12 + length:]


def test_unknown_encoding_is_refused(tmp_path: Path) -> None:
    sealed = _write(tmp_path, "ingest-1-20261127T120000000000-000001").seal()
    doc, rest = _split_header(sealed)
    doc["encoding"] = "aes-256-gcm-v9"
    header = json.dumps(doc).encode()
    sealed.write_bytes(b"\x93RPMLND\x02" + struct.pack("<I", len(header)) + header + rest)
    with pytest.raises(ValueError, match="unsupported landing format"):
        list(read_segment(sealed))


def test_unknown_format_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / f"x{SEGMENT_SUFFIX}"
    path.write_bytes(json.dumps({"rpm_landing": 2, "encoding": "plain"}).encode() + b"\n")  # v2 is binary
    with pytest.raises(ValueError, match="unsupported landing format"):
        list(read_segment(path))
    path.write_bytes(b"\x93RPMLND\x03" + _write(tmp_path, "y").seal().read_bytes()[8:])
    with pytest.raises(ValueError, match="version 3 is not supported"):
        list(read_segment(path))


# --- encryption at rest (what the ingest service writes) -------------------------------------------------

@pytest.fixture
def keyring(settings: Settings) -> Keyring:
    return Keyring.load(settings, "landing")


def _frames(path: Path) -> tuple[bytes, list[bytes]]:
    """A v2 segment's header bytes and its frames (blocks, then the trailer), each with its 9-byte frame head."""
    data = path.read_bytes()
    (length,) = struct.unpack_from("<I", data, 8)
    off, frames = 12 + length, []
    while off < len(data):
        _, _, size = struct.unpack_from("<cII", data, off)
        frames.append(data[off:off + 9 + size])
        off += 9 + size
    return data[:12 + length], frames


def test_encrypted_round_trip_and_no_plaintext_on_disk(tmp_path: Path, keyring: Keyring) -> None:
    w = SegmentWriter(tmp_path, "ingest-1-20261127T120000000000-000001", now=T0, keyring=keyring)
    for topic, payload, received_at, mark in MESSAGES:
        w.append(topic, payload, received_at, mark)
    sealed = w.seal()

    header = read_header(sealed)
    assert (header["encoding"], header["key_id"]) == ("aesgcm-hkdf-v2", keyring.active)
    on_disk = sealed.read_bytes()
    assert b"heart_rate" not in on_disk and b"bp-001" not in on_disk
    assert base64.b64encode(MESSAGES[0][1]) not in on_disk

    records = list(read_segment(sealed, keyring))
    assert [(r.topic, r.payload, r.received_at, r.mark) for r in records] == MESSAGES
    assert segment_key_ids(sealed) == {keyring.active}


def test_encrypted_segment_is_refused_without_the_keyring(tmp_path: Path, keyring: Keyring) -> None:
    w = SegmentWriter(tmp_path, "ingest-1-20261127T120000000000-000001", keyring=keyring)
    w.append(*MESSAGES[0])
    sealed = w.seal()
    with pytest.raises(ValueError, match="keyring"):
        list(read_segment(sealed))


def _encrypted(tmp_path: Path, keyring: Keyring, name: str = "ingest-1-20261127T120000000000-000001") -> Path:
    """Two records per block (ingest: one block per fsync group)."""
    w = SegmentWriter(tmp_path, name, keyring=keyring)
    for i, m in enumerate(MESSAGES):
        w.append(*m)
        if i % 2:
            w.flush_block()
    return w.seal()


def test_altered_block_fails_authentication(tmp_path: Path, keyring: Keyring) -> None:
    sealed = _encrypted(tmp_path, keyring)
    header, frames = _frames(sealed)
    block = bytearray(frames[1])
    block[-1] ^= 0x01
    sealed.write_bytes(header + frames[0] + bytes(block) + frames[2])
    with pytest.raises(DecryptError):
        list(read_segment(sealed, keyring))


def test_reordered_blocks_fail_authentication(tmp_path: Path, keyring: Keyring) -> None:
    sealed = _encrypted(tmp_path, keyring)
    header, frames = _frames(sealed)
    sealed.write_bytes(header + frames[1] + frames[0] + frames[2])
    with pytest.raises(DecryptError):
        list(read_segment(sealed, keyring))


def test_block_moved_into_another_segment_fails_authentication(tmp_path: Path, keyring: Keyring) -> None:
    a = _encrypted(tmp_path, keyring, "ingest-1-20261127T120000000000-000001")
    b = _encrypted(tmp_path, keyring, "ingest-1-20261127T120000000000-000002")
    (_, frames_a), (header_b, frames_b) = _frames(a), _frames(b)
    b.write_bytes(header_b + frames_a[0] + frames_b[1] + frames_b[2])  # same position, other segment
    with pytest.raises(DecryptError):
        list(read_segment(b, keyring))


def test_encrypted_torn_tail_is_skipped_and_recovered(tmp_path: Path, keyring: Keyring) -> None:
    w = SegmentWriter(tmp_path, "ingest-1-20261127T120000000000-000001", keyring=keyring)
    for m in MESSAGES[:2]:
        w.append(*m)
    w.sync()
    w.close_unsealed()
    with open(w.path, "ab") as f:
        f.write(TORN_BLOCK)  # crash in the middle of a block
    [sealed] = recover_open_segments(tmp_path, "ingest-1", keyring)  # the trailer is sealed under its subkey
    assert [r.payload for r in read_segment(sealed, keyring)] == [m[1] for m in MESSAGES[:2]]


def test_rotated_keyring_still_reads_old_segments_and_reencrypts_them(tmp_path: Path, keyring: Keyring) -> None:
    sealed = _encrypted(tmp_path, keyring)
    old = keyring.active
    new = keyring.add_active()
    assert [r.payload for r in read_segment(sealed, keyring)] == [m[1] for m in MESSAGES]

    reencrypt_segment(sealed, keyring)

    assert segment_key_ids(sealed) == {new}
    keyring.retire({old})
    assert [(r.topic, r.payload, r.received_at, r.mark) for r in read_segment(sealed, keyring)] == MESSAGES
