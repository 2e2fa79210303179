"""Poison segments: one unreadable file in landing/sealed/ is set aside, explained and counted — never a wall.

What a user relies on: the run loads every other segment; the bad file is moved untouched into
landing/rejected/ with its reason (no payload values in it), recorded in the ledger and the accounting
(which stays balanced), and it can be put back after a fix to be absorbed by the next run. A fault of the
environment (an OSError) is not poison: the task fails and nothing is moved.
"""

from __future__ import annotations

import json
import os
import struct
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from core import landing
from core.keyring import Keyring
from core.landing import (
    BAD_HEADER,
    BAD_RECORD,
    DECRYPT_FAILED,
    NOT_A_REGULAR_FILE,
    UNAUTHENTICATED,
    UNKNOWN_KEY,
    SegmentWriter,
    UnreadableSegment,
    list_rejected,
    list_sealed,
    read_whole_segment,
    reject_segment,
    rejected_dir,
    rejection_of,
    restore_rejected,
    sealed_dir,
)
from core.settings import Settings
from pipeline.tasks import record_run
from tests.steps import claim_segments, load_batch, stage_batch, validate_batch
from warehouse.accounting import accounting, describe_rejected
from warehouse.db import clinical
from warehouse.ledger import replay_rejected, waiting_rejected
from warehouse.registry import enroll, upsert_patient

DEVICE = "bp-1"
TOPIC = f"rpm/v1/devices/{DEVICE}/vitals"
PHI = "Jane-Doe-lives-at-12-Elm-Street"  # must never reach a reason, a log line or the ledger


def run_pipeline(s: Settings, run_id: str) -> dict:
    """claim -> stage -> validate -> load -> record the run, each with its own connection as in the DAG."""
    batch = claim_segments(s)
    claimed = batch.to_xcom()
    staged = stage_batch(s, batch)
    failures = validate_batch(s, batch)
    loaded = load_batch(s, batch, run_id)
    run = record_run(run_id, None, {"claim": claimed, "decode_normalise": staged, "validate": failures,
                                    "load": loaded}, s=s)
    return {"batch": batch, "staged": staged, "loaded": loaded, "run": run}


@pytest.fixture
def now() -> datetime:
    return datetime.now(UTC)


@pytest.fixture
def enrolled(settings: Settings, now: datetime) -> None:
    with clinical(settings) as con:
        upsert_patient(con, "pat-1")
        enroll(con, DEVICE, "pat-1", kind="bp", valid_from=now - timedelta(days=2))


def readings(n: int, now: datetime, tag: str) -> list[tuple[str, bytes]]:
    return [(TOPIC, json.dumps({"msg_id": f"{tag}-{i}", "metric": "heart_rate", "value": 60 + i, "unit": "/min",
                                "measured_at": (now - timedelta(minutes=10 + i)).isoformat()}).encode())
            for i in range(n)]


def foreign_segment(s: Settings, name: str, messages) -> tuple[Path, Keyring]:
    """A segment sealed under a key the landing keyring does not hold (e.g. a key lost in a restore)."""
    other = Keyring.load(Settings(home=Path(s.home) / "elsewhere"), "landing")  # type: ignore[arg-type]
    w = SegmentWriter(s.landing_dir, name, keyring=other)  # type: ignore[arg-type]
    for topic, payload in messages:
        w.append(topic, payload, datetime.now(UTC))
    return w.seal(), other


def authentic_garbage(s: Settings, ring: Keyring, name: str, now: datetime) -> Path:
    """A sealed segment whose one block is authentic (sealed under its subkey) but whose plaintext does not
    parse: its record sizes do not add up (what a writer bug would leave)."""
    w = SegmentWriter(s.landing_dir, name, keyring=ring)  # type: ignore[arg-type]
    w.append(TOPIC, PHI.encode(), now)
    w.flush_block()
    cipher = w._cipher
    assert cipher is not None
    plain = struct.pack("<II", 0, 0) + struct.pack("<q", 0) + struct.pack("<III", 0, 0, 999) + PHI.encode()
    body = cipher.encrypt(landing._nonce(1), plain, landing._block_aad(name.encode(), 1, 1, 1))
    w._write(struct.pack("<cII", b"B", 1, len(body)), body)  # block 1, record 1: an authentic position
    w.blocks, w._written = 2, 2
    w._chain.update(body[-16:])
    return w.seal()


def drop_in_sealed(s: Settings, name: str, data: bytes) -> Path:
    path = sealed_dir(s.landing_dir) / f"{name}.seg"  # type: ignore[arg-type]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# --- what makes a segment poison, and what the reason says -------------------------------------------------

def test_each_kind_of_unreadable_segment_is_named_with_its_reason_and_no_payload(
        settings: Settings, write_segment, now: datetime) -> None:
    ring = Keyring.load(settings, "landing")
    cases: dict[str, tuple[Path, str]] = {}
    cases["garbage"] = (drop_in_sealed(settings, "x-000001", b"\x00\xffgarbage " + PHI.encode()), BAD_HEADER)
    cases["truncated header"] = (drop_in_sealed(settings, "x-000002", b'{"rpm_landing": 1, "segm'), BAD_HEADER)
    cases["payload file"] = (drop_in_sealed(settings, "x-000003", json.dumps(
        {"metric": "heart_rate", "value": 72, "note": PHI}).encode() + b"\n"), BAD_HEADER)
    cases["unknown key"] = (foreign_segment(settings, "x-000004", readings(2, now, "k"))[0], UNKNOWN_KEY)
    tampered = write_segment("x-000005", readings(3, now, "t"))
    data = bytearray(tampered.read_bytes())
    block_at = 12 + struct.unpack_from("<I", data, 8)[0]  # after the magic, header length and header
    data[block_at + 9 + struct.unpack_from("<cII", data, block_at)[2] - 1] ^= 1  # one bit of the block's tag
    tampered.write_bytes(bytes(data))
    cases["altered block"] = (tampered, DECRYPT_FAILED)
    cases["block that does not parse"] = (authentic_garbage(settings, ring, "x-000006", now), BAD_RECORD)
    plain = SegmentWriter(settings.landing_dir, "x-000007")  # type: ignore[arg-type]  # no keyring: not encrypted
    plain.append(TOPIC, json.dumps({"metric": "blood_pressure", "note": PHI}).encode(), now)
    cases["not encrypted"] = (plain.seal(), UNAUTHENTICATED)
    copy = sealed_dir(settings.landing_dir) / "x-000008.seg"  # type: ignore[arg-type]
    copy.write_bytes(write_segment("x-000009", readings(1, now, "c")).read_bytes())
    cases["a copy under another name"] = (copy, BAD_HEADER)
    fifo = sealed_dir(settings.landing_dir) / "x-000010.seg"  # type: ignore[arg-type]
    os.mkfifo(fifo)  # opening it for reading would block until a writer appears
    cases["a FIFO"] = (fifo, NOT_A_REGULAR_FILE)
    (sealed_dir(settings.landing_dir) / "x-000011.seg").mkdir()  # type: ignore[arg-type]
    cases["a directory"] = (sealed_dir(settings.landing_dir) / "x-000011.seg", NOT_A_REGULAR_FILE)  # type: ignore[arg-type]
    secret = settings.home / "not-landing.txt"
    secret.write_text(PHI)
    link = sealed_dir(settings.landing_dir) / "x-000012.seg"  # type: ignore[arg-type]
    link.symlink_to(secret)
    cases["a symlink"] = (link, NOT_A_REGULAR_FILE)

    for what, (path, reason) in cases.items():
        with pytest.raises(UnreadableSegment) as info:
            read_whole_segment(path, ring)
        assert info.value.reason == reason, what
        assert PHI not in str(info.value) and "heart_rate" not in info.value.detail, what  # (a key id may hold any digits)
    assert "block 0 (records 0-2)" in str(pytest.raises(UnreadableSegment, read_whole_segment, tampered, ring).value)
    with pytest.raises(UnreadableSegment, match=r"block 1 \(records 1-1\): ValueError: block sizes add up"):
        read_whole_segment(cases["block that does not parse"][0], ring)


def test_a_torn_final_block_is_not_poison(settings: Settings, now: datetime) -> None:
    """A crash while writing leaves a torn last block that was never acked: recovery drops it and seals the
    rest, which reads as before."""
    ring = Keyring.load(settings, "landing")
    w = SegmentWriter(settings.landing_dir, "x-000001", keyring=ring)  # type: ignore[arg-type]
    for topic, payload in readings(3, now, "t"):
        w.append(topic, payload, now)
    w.sync()
    w.close_unsealed()
    with open(w.path, "ab") as f:
        f.write(struct.pack("<cII", b"B", 2, 500) + b"\x01" * 40)  # never fsynced, never acked
    [path] = landing.recover_open_segments(settings.landing_dir, "x", ring)  # type: ignore[arg-type]
    assert [r.n for r in read_whole_segment(path, ring)] == [0, 1, 2]


def test_reject_moves_the_file_untouched_with_its_reason_and_restore_puts_it_back(settings: Settings) -> None:
    data = b"\x00\xffnot a segment\nsecond line\n"
    path = drop_in_sealed(settings, "x-000001", data)
    info = reject_segment(settings.landing_dir, path, BAD_HEADER, "first line is a JSON list",  # type: ignore[arg-type]
                          origin="batch b1")

    assert list_sealed(settings.landing_dir) == []  # type: ignore[arg-type]
    assert [p.name for p in list_rejected(settings.landing_dir)] == ["x-000001.seg"]  # type: ignore[arg-type]
    assert (rejected_dir(settings.landing_dir) / "x-000001.seg").read_bytes() == data  # type: ignore[arg-type]
    assert (info.records, info.bytes, info.reason) == (1, len(data), BAD_HEADER)
    assert rejection_of(rejected_dir(settings.landing_dir) / "x-000001.seg") == info  # type: ignore[arg-type]

    restored = restore_rejected(settings.landing_dir, "x-000001")  # type: ignore[arg-type]
    assert restored.read_bytes() == data and list_rejected(settings.landing_dir) == []  # type: ignore[arg-type]
    assert list(rejected_dir(settings.landing_dir).iterdir()) == []  # type: ignore[arg-type]  # sidecar gone too


# --- through the pipeline's tasks ---------------------------------------------------------------------------

def test_a_poison_segment_is_set_aside_and_the_run_loads_everything_else(
        settings: Settings, enrolled, write_segment, now: datetime, caplog) -> None:
    write_segment("ingest-1-000001", readings(3, now, "a"))
    drop_in_sealed(settings, "ingest-1-000002", b"\x00\xffgarbage\n" + PHI.encode() + b"\n")
    write_segment("ingest-1-000003", readings(2, now - timedelta(hours=1), "c"))

    with caplog.at_level("WARNING", logger="pipeline.stage"):
        out = run_pipeline(settings, "t1")

    assert out["loaded"]["loaded"] == 5  # the segments before and after the poison one
    assert [p.stem for p in list_rejected(settings.landing_dir)] == ["ingest-1-000002"]  # type: ignore[arg-type]
    warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warning) == 1 and "ingest-1-000002.seg" in warning[0] and BAD_HEADER in warning[0]
    assert PHI not in warning[0]
    acc = accounting(settings)
    assert acc["balanced"] is True and (acc["received"], acc["loaded"]) == (5, 5)
    assert acc["pending"]["sealed_segments"] == 0  # every sealed segment: absorbed, rejected or pending
    assert acc["rejected"]["segments"] == 1 and acc["rejected"]["messages"] == 1
    assert acc["rejected"]["by_reason"] == {BAD_HEADER: 1}
    assert [w["segment"] for w in acc["rejected"]["waiting"]] == ["ingest-1-000002"]
    assert PHI not in json.dumps(acc, default=str)
    assert out["run"]["rejected_segments"] == 1
    with clinical(settings) as con:
        assert con.execute("SELECT rejected_segments FROM pipeline_runs WHERE run_id = 't1'").fetchone() == (1,)
        assert con.execute("SELECT run_id, replayed_at FROM rejected_segments").fetchall() == [("t1", None)]

    assert describe_rejected(acc)[1].split() == ["ingest-1-000002", f"{BAD_HEADER}:",
                                                 *acc["rejected"]["waiting"][0]["detail"].split()]

    again = run_pipeline(settings, "t2")  # nothing left to claim; the rejection is not counted twice
    assert again["batch"].segments == [] and again["run"]["rejected_segments"] == 0
    assert accounting(settings) == acc


def test_a_retried_stage_skips_what_its_first_attempt_set_aside(
        settings: Settings, enrolled, write_segment, now: datetime) -> None:
    """Airflow retries a failed task with the same batch: the segment already moved is neither an error nor
    rejected twice."""
    write_segment("ingest-1-000001", readings(2, now, "a"))
    drop_in_sealed(settings, "ingest-1-000002", b"garbage")
    batch = claim_segments(settings)
    first = stage_batch(settings, batch)
    retry = stage_batch(settings, batch)
    assert (first["rejected"], retry["rejected"]) == (1, 0)  # what each call set aside itself
    assert {**first, "rejected": 0} == retry and retry["segments"] == 1
    validate_batch(settings, batch)
    assert load_batch(settings, batch, "t1")["loaded"] == 2
    with clinical(settings) as con:
        assert con.execute("SELECT times_rejected FROM rejected_segments").fetchall() == [(1,)]


def test_an_environment_fault_fails_the_stage_and_moves_nothing(
        settings: Settings, enrolled, write_segment, now: datetime) -> None:
    """An I/O error is not the segment's fault: the task fails (and retries) instead of hiding data — here
    the rejected area cannot be created, so a poison segment cannot be set aside."""
    write_segment("ingest-1-000001", readings(1, now, "a"))
    poison = drop_in_sealed(settings, "ingest-1-000002", b"garbage")
    rejected_dir(settings.landing_dir).write_bytes(b"")  # type: ignore[arg-type]  # a file where the folder goes
    batch = claim_segments(settings)
    with pytest.raises(FileExistsError):
        stage_batch(settings, batch)
    assert poison.exists()


def test_a_fifo_a_directory_and_a_symlink_in_sealed_are_set_aside_and_the_run_goes_on(
        settings: Settings, enrolled, write_segment, now: datetime) -> None:
    """A FIFO would block the reader forever, a directory fail every run, a symlink leak what it points to."""
    write_segment("ingest-1-000001", readings(2, now, "a"))
    os.mkfifo(sealed_dir(settings.landing_dir) / "ingest-1-000002.seg")  # type: ignore[arg-type]
    (sealed_dir(settings.landing_dir) / "ingest-1-000003.seg").mkdir()  # type: ignore[arg-type]
    (sealed_dir(settings.landing_dir) / "ingest-1-000004.seg").symlink_to("/etc/passwd")  # type: ignore[arg-type]
    out = run_pipeline(settings, "t1")
    assert out["loaded"]["loaded"] == 2 and out["staged"]["rejected"] == 3
    with clinical(settings) as con:
        rows = con.execute("SELECT segment, reason, records, bytes FROM rejected_segments ORDER BY 1").fetchall()
    assert [(r[0], r[1], r[2]) for r in rows] == [(f"ingest-1-00000{i}", NOT_A_REGULAR_FILE, 0) for i in (2, 3, 4)]
    assert rows[2][3] == len("/etc/passwd")  # the link's own size: the target is never read
    assert accounting(settings)["rejected"]["segments"] == 3


def test_a_crash_between_the_move_and_its_row_is_reconciled_by_the_next_run(
        settings: Settings, enrolled, write_segment, now: datetime) -> None:
    path = drop_in_sealed(settings, "ingest-1-000001", b"garbage")
    reject_segment(settings.landing_dir, path, BAD_HEADER, "Expecting value", origin="batch b0")  # type: ignore[arg-type]
    with clinical(settings) as con:  # the crash: the file moved, no row yet — still seen, from its sidecar
        assert [w.segment for w in waiting_rejected(con, settings.landing_dir)] == ["ingest-1-000001"]  # type: ignore[arg-type]
        assert con.execute("SELECT count(*) FROM rejected_segments").fetchone() == (0,)

    write_segment("ingest-1-000002", readings(1, now, "b"))
    run_pipeline(settings, "t1")

    with clinical(settings) as con:
        assert con.execute("SELECT segment, reason, replayed_at FROM rejected_segments").fetchall() == [
            ("ingest-1-000001", BAD_HEADER, None)]
    assert accounting(settings)["rejected"]["segments"] == 1


def test_a_segment_replayed_after_its_key_is_restored_is_absorbed(
        settings: Settings, enrolled, write_segment, now: datetime) -> None:
    write_segment("ingest-1-000001", readings(2, now, "a"))
    _, lost_ring = foreign_segment(settings, "ingest-1-000002", readings(3, now - timedelta(hours=1), "b"))
    run_pipeline(settings, "t1")
    assert accounting(settings)["rejected"]["by_reason"] == {UNKNOWN_KEY: 1}

    # The fix: the lost key comes back from a backup into the landing keyring.
    ring = Keyring.load(settings, "landing")
    doc = json.loads(ring.path.read_text())
    doc["keys"].update({k: v.hex() for k, v in lost_ring.keys.items()})
    ring.path.write_text(json.dumps(doc))
    with clinical(settings) as con:
        assert replay_rejected(con, settings.landing_dir, ["ingest-1-000002"]) == ["ingest-1-000002"]  # type: ignore[arg-type]
    assert accounting(settings)["rejected"]["segments"] == 0  # waiting no more: pending again
    assert accounting(settings)["pending"]["sealed_segments"] == 1

    out = run_pipeline(settings, "t2")

    assert out["loaded"]["loaded"] == 3
    acc = accounting(settings)
    assert acc["balanced"] is True and (acc["loaded"], acc["segments_processed"]) == (5, 2)
    assert acc["rejected"]["segments"] == 0 and acc["pending"]["sealed_segments"] == 0
    with clinical(settings) as con:
        assert con.execute("SELECT replayed_at IS NOT NULL FROM rejected_segments").fetchall() == [(True,)]


def test_a_segment_replayed_without_a_fix_is_set_aside_again(
        settings: Settings, enrolled, write_segment, now: datetime) -> None:
    drop_in_sealed(settings, "ingest-1-000001", b"[1, 2]\n")
    run_pipeline(settings, "t1")
    with clinical(settings) as con:
        replay_rejected(con, settings.landing_dir, None)  # type: ignore[arg-type]
        with pytest.raises(FileNotFoundError, match="no rejected segment"):
            replay_rejected(con, settings.landing_dir, ["../sealed/ingest-1-000001"])  # type: ignore[arg-type]

    run_pipeline(settings, "t2")

    assert [p.stem for p in list_rejected(settings.landing_dir)] == ["ingest-1-000001"]  # type: ignore[arg-type]
    with clinical(settings) as con:
        assert con.execute("SELECT times_rejected, replayed_at, run_id FROM rejected_segments").fetchall() == [
            (2, None, "t2")]
    assert accounting(settings)["rejected"]["waiting"][0]["detail"] == (
        "first line is a JSON list, not a landing header")
