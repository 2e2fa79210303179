"""Landing format v2: blocks under a per-segment subkey, a sealed trailer, columns for the pipeline — and the
v1 segments already on disk still read, count and rotate until they are gone."""

from __future__ import annotations

import json
import shutil
import struct
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from core import keys
from core.keyring import Keyring
from core.landing import (
    BAD_RECORD,
    DECRYPT_FAILED,
    TRUNCATED,
    UNAUTHENTICATED,
    UNKNOWN_KEY,
    LandedColumns,
    SegmentWriter,
    UnreadableSegment,
    count_records,
    list_sealed,
    open_dir,
    read_header,
    read_segment,
    read_segment_columns,
    read_whole_segment,
    recover_open_segments,
    reencrypt_segment,
    sealed_dir,
    segment_key_ids,
    to_us,
)
from core.settings import Settings
from rpmctl.admin.rotate import rotate_landing

FIXTURES = Path(__file__).parent.parent / "fixtures" / "landing_v1"
V1_ENCRYPTED = "ingest-1-20261127T120000000000-000001"
V1_PLAIN = "ingest-1-20261127T120000000000-000002"
V1_OPEN = "ingest-1-20261127T120000000000-000003"
T0 = datetime(2026, 11, 27, 12, 0, 0, 123456, tzinfo=UTC)
# The messages the v1 fixtures hold (written by the v1 writer): raw bytes kept exactly, marks, µs instants.
MESSAGES = [
    ("rpm/v1/devices/bp-001/vitals", b'{"metric": "heart_rate", "value": 72}', T0, None),
    ("rpm/v1/devices/bp-001/vitals", b"\xff\xfe\x00 not utf-8 \x80\n\r", T0 + timedelta(microseconds=1), None),
    ("rpm/v1/devices/+/vitals", b"", T0 + timedelta(seconds=1), "unknown_topic"),
    ("rpm/v1/devices/bp-002/vitals", bytes(range(256)),
     datetime(2026, 11, 27, 7, 0, 2, tzinfo=timezone(timedelta(hours=-5))), None),
]
NAME = "ingest-1-20261127T120000000000-000009"


def fixture_keyring() -> Keyring:
    doc = json.loads((FIXTURES / "landing.keyring.json").read_text())
    return Keyring(FIXTURES / "landing.keyring.json", doc["active"],
                   {k: bytes.fromhex(v) for k, v in doc["keys"].items()})


def v1_copy(landing: Path, name: str, where: str = "sealed") -> Path:
    source = FIXTURES / ("open" if where == "open" else "") / f"{name}.seg"
    target = landing / where / source.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, target)
    return target


def as_tuples(records) -> list[tuple]:
    return [(r.topic, r.payload, r.received_at, r.mark) for r in records]


@pytest.fixture
def ring(settings: Settings) -> Keyring:
    return Keyring.load(settings, "landing")


def segment(landing: Path, keyring: Keyring | None, blocks: list[list[tuple]], name: str = NAME,
            seal: bool = True) -> SegmentWriter | Path:
    """A segment with one block per inner list (ingest: one block per fsync group)."""
    w = SegmentWriter(landing, name, now=T0, keyring=keyring)
    for block in blocks:
        for m in block:
            w.append(*m)
        w.flush_block()
    return w.seal() if seal else w


def frames(path: Path) -> tuple[bytes, list[bytes]]:
    """Header bytes and frames (blocks, then the trailer), each frame with its 9-byte head."""
    data = path.read_bytes()
    off = 12 + struct.unpack_from("<I", data, 8)[0]
    head, out = data[:off], []
    while off < len(data):
        size = struct.unpack_from("<cII", data, off)[2]
        out.append(data[off:off + 9 + size])
        off += 9 + size
    return head, out


def reason(path: Path, keyring: Keyring | None) -> str:
    with pytest.raises(UnreadableSegment) as info:
        read_whole_segment(path, keyring)
    with pytest.raises(UnreadableSegment) as same:
        read_segment_columns(path, keyring)
    assert same.value.reason == info.value.reason  # one set of reasons for both readers
    return info.value.reason


# --- v2 round trips -----------------------------------------------------------------------------------------

def test_encrypted_round_trip_in_blocks_columns_and_records_agree(tmp_path: Path, ring: Keyring) -> None:
    path = segment(tmp_path, ring, [MESSAGES[:1], MESSAGES[1:3], MESSAGES[3:]])
    assert isinstance(path, Path)
    assert as_tuples(read_whole_segment(path, ring)) == MESSAGES
    cols = read_segment_columns(path, ring)
    assert isinstance(cols, LandedColumns)
    assert cols == LandedColumns([0, 1, 2, 3], [m[0] for m in MESSAGES], [to_us(m[2]) for m in MESSAGES],
                                 [m[1] for m in MESSAGES], [m[3] for m in MESSAGES])
    assert as_tuples(read_segment(path, ring)) == MESSAGES
    assert count_records(path) == 4 and segment_key_ids(path) == {ring.active}
    assert len(frames(path)[1]) == 4  # three blocks and the trailer
    on_disk = path.read_bytes()
    assert b"heart_rate" not in on_disk and b"bp-001" not in on_disk and bytes(range(256)) not in on_disk


def test_plain_round_trip_and_a_keyring_reader_calls_it_unauthenticated(tmp_path: Path, ring: Keyring) -> None:
    path = segment(tmp_path, None, [MESSAGES, MESSAGES[:1]])
    assert isinstance(path, Path)
    assert as_tuples(read_whole_segment(path)) == [*MESSAGES, *MESSAGES[:1]]
    assert read_header(path)["encoding"] == "plain" and segment_key_ids(path) == set()
    assert reason(path, ring) == UNAUTHENTICATED


def test_each_segment_has_its_own_subkey(tmp_path: Path, ring: Keyring) -> None:
    """Same key, same name, same records: different salts, so different subkeys and ciphertexts (block-index
    nonces never repeat under one subkey)."""
    a = segment(tmp_path / "a", ring, [MESSAGES])
    b = segment(tmp_path / "b", ring, [MESSAGES])
    assert isinstance(a, Path) and isinstance(b, Path)
    assert read_header(a)["salt"] != read_header(b)["salt"]
    assert frames(a)[1][0] != frames(b)[1][0]


def test_a_flushed_block_is_readable_before_fsync_and_sealing(tmp_path: Path, ring: Keyring) -> None:
    w = segment(tmp_path, ring, [], seal=False)
    assert isinstance(w, SegmentWriter)
    w.append(*MESSAGES[0])
    assert count_records(w.path) == 0 and w.records == 1  # pending: not in the file yet
    assert w.flush_block() == 1 and w.flush_block() == 0
    assert [r.payload for r in read_segment(w.path, ring)] == [MESSAGES[0][1]]
    assert count_records(w.path) == 1 and w.bytes == w.path.stat().st_size
    w.fsync()
    w.append(*MESSAGES[1])
    w.sync()
    assert count_records(w.path) == 2 and w.blocks == 2
    assert as_tuples(read_whole_segment(w.seal(), ring)) == MESSAGES[:2]


# --- what a sealed v2 segment must prove --------------------------------------------------------------------

def test_a_segment_cut_at_a_block_boundary_is_truncated(tmp_path: Path, ring: Keyring) -> None:
    path = segment(tmp_path, ring, [MESSAGES[:2], MESSAGES[2:]])
    assert isinstance(path, Path)
    head, (b0, b1, trailer) = frames(path)
    path.write_bytes(head + b0 + b1)  # the trailer cut off
    assert reason(path, ring) == TRUNCATED
    path.write_bytes(head + b0)
    assert reason(path, ring) == TRUNCATED
    path.write_bytes(head + b0 + trailer)  # the last block cut out, the trailer kept
    with pytest.raises(UnreadableSegment, match="trailer counts 4 records in 2 blocks, the file holds 2 in 1"):
        read_whole_segment(path, ring)
    assert count_records(path) == 2  # counting needs no key and says what is there


def test_a_block_from_another_segment_or_out_of_order_fails(tmp_path: Path, ring: Keyring) -> None:
    a = segment(tmp_path, ring, [MESSAGES[:2], MESSAGES[2:]], name=NAME)
    b = segment(tmp_path, ring, [MESSAGES[:2], MESSAGES[2:]], name=NAME[:-1] + "8")
    assert isinstance(a, Path) and isinstance(b, Path)
    head_a, (a0, a1, a_trailer) = frames(a)
    head_b, (b0, b1, b_trailer) = frames(b)
    a.write_bytes(head_a + b0 + a1 + a_trailer)  # same position, same records, other segment
    assert reason(a, ring) == DECRYPT_FAILED
    a.write_bytes(head_a + a1 + a0 + a_trailer)  # reordered
    assert reason(a, ring) == DECRYPT_FAILED
    a.write_bytes(head_a + a0 + a1 + b_trailer)  # the trailer of another segment
    assert reason(a, ring) == DECRYPT_FAILED
    a.write_bytes(head_b + a0 + a1 + a_trailer)  # another segment's header (salt): another subkey
    with pytest.raises(UnreadableSegment):
        read_whole_segment(a, ring)


def test_an_altered_trailer_or_header_or_bytes_after_the_trailer_are_detected(tmp_path: Path, ring: Keyring) -> None:
    path = segment(tmp_path, ring, [MESSAGES])
    assert isinstance(path, Path)
    head, (block, trailer) = frames(path)
    altered = bytearray(trailer)
    altered[20] ^= 1
    path.write_bytes(head + block + bytes(altered))
    assert reason(path, ring) == DECRYPT_FAILED
    doc = read_header(path)
    doc["created_at"] = "2020-01-01T00:00:00.000000Z"  # the whole header is the subkey's HKDF info
    header = json.dumps(doc, separators=(",", ":")).encode()
    path.write_bytes(head[:8] + struct.pack("<I", len(header)) + header + block + trailer)
    assert reason(path, ring) == DECRYPT_FAILED
    path.write_bytes(head + block + trailer + b"\x00")
    assert reason(path, ring) == BAD_RECORD


def test_wrong_key_and_unknown_key_id(tmp_path: Path, ring: Keyring) -> None:
    path = segment(tmp_path, ring, [MESSAGES])
    assert isinstance(path, Path)
    wrong = Keyring(tmp_path / "unused.json", ring.active, {ring.active: bytes(32)})
    assert reason(path, wrong) == DECRYPT_FAILED
    other = Keyring(tmp_path / "unused.json", "k-other", {"k-other": bytes(32)})
    assert reason(path, other) == UNKNOWN_KEY


# --- crash recovery -----------------------------------------------------------------------------------------

def test_recovery_drops_a_torn_or_unwritten_tail_block_and_seals_with_a_trailer(tmp_path: Path,
                                                                                ring: Keyring) -> None:
    w = segment(tmp_path, ring, [MESSAGES[:2], MESSAGES[2:3]], seal=False)
    assert isinstance(w, SegmentWriter)
    w.fsync()
    w.close_unsealed()
    intact = w.path.read_bytes()
    _, (_, last) = frames(w.path)
    # The last block complete in size but not in content (its pages never reached the disk: zeros).
    w.path.write_bytes(intact[:-len(last)] + last[:9] + bytes(len(last) - 9))
    assert count_records(w.path) == 3  # by its frame, before recovery looks inside
    [sealed] = recover_open_segments(tmp_path, "ingest-1", ring)
    assert as_tuples(read_whole_segment(sealed, ring)) == MESSAGES[:2]
    assert count_records(sealed) == 2


def test_recovery_of_a_segment_that_died_between_trailer_and_rename(tmp_path: Path, ring: Keyring) -> None:
    w = segment(tmp_path, ring, [MESSAGES], seal=False)
    assert isinstance(w, SegmentWriter)
    w.finish()  # trailer written and fsynced; the rename never happened
    data = w.path.read_bytes()
    [sealed] = recover_open_segments(tmp_path, "ingest-1", ring)
    assert sealed.read_bytes() == data and as_tuples(read_whole_segment(sealed, ring)) == MESSAGES


def test_recovery_needs_the_key_of_an_encrypted_segment(tmp_path: Path, ring: Keyring) -> None:
    w = segment(tmp_path, ring, [MESSAGES], seal=False)
    assert isinstance(w, SegmentWriter)
    w.close_unsealed()
    with pytest.raises(ValueError, match="keyring is needed"):
        recover_open_segments(tmp_path, "ingest-1")
    stranger = Keyring(tmp_path / "unused.json", "k-other", {"k-other": bytes(32)})
    assert recover_open_segments(tmp_path, "ingest-1", stranger) == []  # left in open/, still counted there
    assert count_records(w.path) == 4 and list(open_dir(tmp_path).iterdir()) == [w.path]


# --- v1 segments keep reading (real files written by the v1 writer) -----------------------------------------

def test_v1_encrypted_and_plain_segments_still_read(tmp_path: Path) -> None:
    ring = fixture_keyring()
    encrypted, plain = v1_copy(tmp_path, V1_ENCRYPTED), v1_copy(tmp_path, V1_PLAIN)
    assert as_tuples(read_whole_segment(encrypted, ring)) == MESSAGES
    assert as_tuples(read_segment(encrypted, ring)) == MESSAGES
    assert read_segment_columns(encrypted, ring) == LandedColumns(
        [0, 1, 2, 3], [m[0] for m in MESSAGES], [to_us(m[2]) for m in MESSAGES], [m[1] for m in MESSAGES],
        [m[3] for m in MESSAGES])
    assert as_tuples(read_whole_segment(plain)) == MESSAGES
    assert reason(plain, ring) == UNAUTHENTICATED
    assert (count_records(encrypted), count_records(plain)) == (4, 4)
    assert segment_key_ids(encrypted) == {ring.active} and segment_key_ids(plain) == set()
    assert read_header(encrypted) == {"rpm_landing": 1, "segment": V1_ENCRYPTED,
                                      "created_at": "2026-11-27T12:00:00.123456Z", "encoding": "aesgcm-v1"}
    wrong = Keyring(tmp_path / "unused.json", ring.active, {ring.active: bytes(32)})
    assert reason(encrypted, wrong) == DECRYPT_FAILED


def test_a_v1_open_segment_is_recovered_as_v1(tmp_path: Path) -> None:
    ring = fixture_keyring()
    opened = v1_copy(tmp_path, V1_OPEN, "open")
    assert count_records(opened) == 2  # the torn third line is not counted
    [sealed] = recover_open_segments(tmp_path, "ingest-1", ring)
    assert as_tuples(read_whole_segment(sealed, ring)) == MESSAGES[:2]


def test_reencrypting_a_v1_segment_writes_v2_with_the_same_records(tmp_path: Path) -> None:
    ring = fixture_keyring()
    path = v1_copy(tmp_path, V1_ENCRYPTED)
    reencrypt_segment(path, ring)
    assert read_header(path)["rpm_landing"] == 2 and read_header(path)["created_at"] == "2026-11-27T12:00:00.123456Z"
    assert as_tuples(read_whole_segment(path, ring)) == MESSAGES
    assert count_records(path) == 4


def test_key_rotation_rewrites_v1_segments_as_v2_under_the_new_key(settings: Settings) -> None:
    fixture = fixture_keyring()
    keys.write_private(settings.secrets_dir / "landing.keyring.json", json.dumps(  # type: ignore[operator]
        {"active": fixture.active, "keys": {k: v.hex() for k, v in fixture.keys.items()}}).encode())
    v1 = v1_copy(settings.landing_dir, V1_ENCRYPTED)  # type: ignore[arg-type]
    v2 = segment(settings.landing_dir, Keyring.load(settings, "landing"), [MESSAGES[:1]])  # type: ignore[arg-type]

    result = rotate_landing(settings)

    ring = Keyring.load(settings, "landing")
    assert result["segments_reencrypted"] == 2 and result["retired"] == [fixture.active]
    assert set(ring.keys) == {result["active"]}
    assert list_sealed(settings.landing_dir) == sorted([v1, v2])  # type: ignore[arg-type]
    assert read_header(v1)["rpm_landing"] == 2 and segment_key_ids(v1) == {ring.active}
    assert as_tuples(read_whole_segment(v1, ring)) == MESSAGES
    assert as_tuples(read_whole_segment(v2, ring)) == MESSAGES[:1]  # type: ignore[arg-type]
    assert not any((sealed_dir(settings.landing_dir) / ".rewrite").iterdir())  # type: ignore[arg-type]


# --- hostile files: memory and counts stay bounded ------------------------------------------------------------

def test_an_oversized_file_is_set_aside_without_being_read(tmp_path: Path) -> None:
    """A planted sparse file (no disk used) of any size: read whole, a 1 GB one took 2 GB of the run's memory
    (a 10 GB one, the machine). Refused by its size alone, as no segment ingest writes is that large."""
    import resource

    sealed_dir(tmp_path).mkdir(parents=True)
    good = segment(tmp_path, None, [MESSAGES[:1]])
    path = sealed_dir(tmp_path) / "ingest-1-20261127T120000000000-000010.seg"
    head = good.read_bytes()[:12 + struct.unpack_from("<I", good.read_bytes(), 8)[0]]  # type: ignore[union-attr]
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(3 << 30)  # 3 GB, sparse
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(UnreadableSegment) as info:
        read_segment_columns(path, None, max_bytes=1 << 30)
    assert info.value.reason == BAD_RECORD and "larger than" in info.value.detail
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024  # KB: nothing read
    v1 = v1_copy(tmp_path, V1_PLAIN)
    with open(v1, "ab") as f:
        f.truncate(3 << 30)  # a v1 "record line" of 3 GB
    with pytest.raises(UnreadableSegment) as info:
        read_segment_columns(v1, None, max_bytes=1 << 30)
    assert info.value.reason == BAD_RECORD and "larger than" in info.value.detail
    assert read_segment_columns(good, None, max_bytes=len(good.read_bytes())).n == [0]  # type: ignore[union-attr]


def test_a_block_head_cannot_claim_more_records_than_its_body_holds(tmp_path: Path) -> None:
    """count_records reads the clear counts (no key): a planted block head claiming 4 billion records, or a
    run of empty blocks claiming 1000 each, must not become billions of messages in the accounting and the
    rejected sidecar; a record takes at least 20 bytes of its block."""
    good = segment(tmp_path, None, [MESSAGES[:2]])
    head, blocks = frames(good)  # type: ignore[arg-type]
    path = sealed_dir(tmp_path) / "ingest-1-20261127T120000000000-000011.seg"
    path.write_bytes(head + struct.pack("<cII", b"B", 2**32 - 1, len(blocks[0]) - 9) + blocks[0][9:] + blocks[1])
    assert count_records(path) == 0
    path.write_bytes(head + struct.pack("<cII", b"B", 1000, 0) * 10_000)
    assert count_records(path) == 0
    assert count_records(good) == 2  # type: ignore[arg-type]


def test_counting_a_huge_sparse_file_does_not_read_it(tmp_path: Path) -> None:
    """count_records (the accounting, the seal trigger, the rejected sidecar) read a file without the v2 magic
    to its end counting lines: a planted sparse file of 1 TB (no disk used) held each of them for minutes."""
    import time

    path = sealed_dir(tmp_path) / "ingest-1-20261127T120000000000-000012.seg"
    path.parent.mkdir(parents=True)
    with open(path, "wb") as f:
        f.write(b'{"rpm_landing": 1}\n')
        f.truncate(1 << 40)
    started = time.monotonic()
    assert count_records(path) == 0
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("damage", ["salt", "nesting"])
def test_recovery_of_an_open_segment_with_a_damaged_header_leaves_it_for_the_operator(tmp_path: Path, ring: Keyring,
                                                                                       damage: str) -> None:
    """Ingest recovers its open segments at every start. One whose header was damaged after its blocks were
    acked (a salt that is not hex; JSON nested within the 64 KiB header limit, which json.loads refuses with
    RecursionError, not ValueError) raised out of recovery: ingest died at every restart and landed nothing.
    Such a file is left in open/ (still counted there, as one whose key is missing), never deleted."""
    w = segment(tmp_path, ring, [MESSAGES[:2]], seal=False)
    w.fsync()  # type: ignore[union-attr]
    w.close_unsealed()  # type: ignore[union-attr]
    data = w.path.read_bytes()  # type: ignore[union-attr]
    header_len = struct.unpack_from("<I", data, 8)[0]
    header = json.loads(data[12:12 + header_len])
    if damage == "salt":
        bad = json.dumps({**header, "salt": "zz" * 16}, separators=(",", ":")).encode()
    else:
        bad = b"[" * 30_000 + b"]" * 30_000
    w.path.write_bytes(data[:8] + struct.pack("<I", len(bad)) + bad + data[12 + header_len:])  # type: ignore[union-attr]
    assert recover_open_segments(tmp_path, "ingest-1", ring) == []
    assert w.path.exists()  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        read_header(w.path)  # type: ignore[union-attr]  # what the metrics read: a ValueError, as for any bad header
