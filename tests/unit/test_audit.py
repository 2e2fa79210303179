"""The PHI access audit log (warehouse/audit.py): an encrypted, HMAC-chained, append-only file with a head.

What a privacy officer relies on: every record chains to the one before; ``verify`` says ok on an intact log
and not ok after any edit, deletion, reordering, truncation, head tampering or a line spliced in from another
log; nothing identifying is readable on disk; key rotation re-seals without breaking the chain; two processes
appending at once still make one chain.
"""

from __future__ import annotations

import base64
import json
import multiprocessing
from pathlib import Path

import pytest

from rpmctl.crypto import DecryptError, Keyring
from rpmctl.settings import Settings
from warehouse.audit import GENESIS, AuditLog

PATIENTS = ["pat-7f3a91", "pat-0c22e4"]
ACTOR = "dr-hildegard-vonbingen"


@pytest.fixture
def log(settings: Settings) -> AuditLog:
    return AuditLog(settings)


def fill(log: AuditLog, n: int = 5) -> list[dict]:
    return [log.append(ACTOR, "patient", [PATIENTS[i % 2]], {"view": "patient", "n": i}, rows=i)
            for i in range(n)]


def lines(log: AuditLog) -> list[bytes]:
    return log.path.read_bytes().splitlines()


def write_lines(log: AuditLog, new: list[bytes]) -> None:
    log.path.write_bytes(b"".join(line + b"\n" for line in new))


def test_append_chains_records_from_genesis(log):
    records = fill(log, 4)
    assert [r["seq"] for r in records] == [0, 1, 2, 3]
    assert records[0]["prev"] == GENESIS
    for before, after in zip(records, records[1:], strict=False):
        assert after["prev"] == before["mac"]
    assert len({r["mac"] for r in records}) == 4
    r = records[1]
    assert (r["actor"], r["action"], r["patients"], r["query"], r["rows"], r["outcome"]) == (
        ACTOR, "patient", [PATIENTS[1]], {"view": "patient", "n": 1}, 1, "ok")
    assert len(lines(log)) == 4


def test_patients_are_recorded_sorted(log):
    r = log.append(ACTOR, "patients", ["b", "c", "a"], {}, rows=3)
    assert r["patients"] == ["a", "b", "c"]


def test_verify_ok_on_intact_log(log):
    assert log.verify() == {"ok": True, "records": 0, "problem": None, "head": {"seq": -1, "mac": GENESIS}}
    records = fill(log)
    v = log.verify()
    assert (v["ok"], v["records"], v["problem"]) == (True, 5, None)
    assert v["head"] == {"seq": 4, "mac": records[-1]["mac"]}
    # a fresh instance (another process) with the same settings agrees
    assert AuditLog(Settings(home=log.dir.parent)).verify()["ok"] is True


def test_records_decrypts_what_was_appended(log):
    appended = fill(log)
    assert log.records() == appended


def test_log_and_head_hold_no_identifiers_in_plaintext(log):
    fill(log)
    for path in (log.path, log.head_path):
        raw = path.read_bytes()
        for secret in [*PATIENTS, ACTOR, "dr-hildegard"]:
            assert secret.encode() not in raw, (path.name, secret)
    # and the base64 lines do not merely encode plaintext JSON
    for line in lines(log):
        assert b"pat-" not in base64.b64decode(line)
        assert b'"actor"' not in base64.b64decode(line)


# --- tampering ----------------------------------------------------------------------------------------------


def _flip(c: int) -> int:
    return ord("B") if c == ord("A") else ord("A")


def test_verify_detects_an_edited_byte(log):
    fill(log)
    ls = lines(log)
    line = bytearray(ls[2])
    line[len(line) // 2] = _flip(line[len(line) // 2])  # still valid base64: the ciphertext changed
    ls[2] = bytes(line)
    write_lines(log, ls)
    v = log.verify()
    assert v["ok"] is False and v["records"] == 2
    assert "line 3" in v["problem"]
    with pytest.raises(DecryptError):
        log.records()


def test_verify_detects_a_deleted_middle_line(log):
    fill(log)
    ls = lines(log)
    write_lines(log, ls[:2] + ls[3:])
    v = log.verify()
    assert v["ok"] is False and v["records"] == 2


def test_verify_detects_two_swapped_lines(log):
    fill(log)
    ls = lines(log)
    ls[1], ls[2] = ls[2], ls[1]
    write_lines(log, ls)
    v = log.verify()
    assert v["ok"] is False and v["records"] == 1


def test_verify_detects_a_truncated_tail(log):
    fill(log)
    write_lines(log, lines(log)[:-1])
    v = log.verify()
    assert v["ok"] is False and v["records"] == 4
    assert "removed from the end" in v["problem"]


def test_verify_detects_an_emptied_log(log):
    fill(log)
    log.path.write_bytes(b"")
    assert log.verify()["ok"] is False


def test_verify_detects_an_altered_head(log):
    records = fill(log)
    head = json.loads(log.head_path.read_text())
    # Point the head at record 3 so a truncated log would look complete: the head's own MAC gives it away.
    head.update(seq=3, mac=records[3]["mac"])
    log.head_path.write_text(json.dumps(head))
    write_lines(log, lines(log)[:-1])
    v = log.verify()
    assert v["ok"] is False and v["problem"] == "head file was altered"


def test_verify_detects_a_removed_head(log):
    fill(log)
    log.head_path.unlink()
    assert log.verify()["ok"] is False


def test_verify_detects_a_line_copied_from_another_log(log, tmp_path):
    fill(log)
    other = AuditLog(Settings(home=tmp_path / "other"))   # its own keyring and MAC key
    fill(other)
    assert Keyring.key_id_of(base64.b64decode(lines(other)[1])) != log.keyring.active
    ls = lines(log)
    ls[1] = lines(other)[1]
    write_lines(log, ls)
    v = log.verify()
    assert v["ok"] is False and v["records"] == 1
    assert "line 2" in v["problem"]


def test_verify_detects_a_line_duplicated_at_the_end(log):
    fill(log)
    ls = lines(log)
    write_lines(log, [*ls, ls[-1]])
    assert log.verify()["ok"] is False


# --- key rotation -------------------------------------------------------------------------------------------


def test_reencrypt_under_a_new_key_keeps_the_chain(log, settings):
    fill(log)
    before = log.records()
    old_kid = log.keyring.active
    old_lines = lines(log)

    new_kid = log.keyring.add_active()
    assert log.reencrypt() == 5

    assert new_kid != old_kid
    assert lines(log) != old_lines
    assert {Keyring.key_id_of(base64.b64decode(line)) for line in lines(log)} == {new_kid}
    fresh = AuditLog(settings)  # reloads the keyring from disk
    assert fresh.keyring.active == new_kid
    assert fresh.verify()["ok"] is True and fresh.verify()["records"] == 5
    assert fresh.records() == before
    # appends after the rotation extend the same chain
    nxt = fresh.append(ACTOR, "alerts", [], {}, rows=0)
    assert (nxt["seq"], nxt["prev"]) == (5, before[-1]["mac"])
    assert fresh.verify()["ok"] is True


# --- two writers --------------------------------------------------------------------------------------------


def _append_many(home: str, worker: int, n: int, barrier) -> None:
    log = AuditLog(Settings(home=Path(home)))
    barrier.wait()  # both processes start appending together
    for i in range(n):
        log.append(f"worker-{worker}", "patients", [f"p-{worker}"], {"i": i}, rows=i)


def test_concurrent_appends_from_two_processes_form_one_chain(settings):
    AuditLog(settings)  # create the keyring and MAC key once, before the writers race
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_append_many, args=(str(settings.home), w, 50, barrier)) for w in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]

    log = AuditLog(settings)
    v = log.verify()
    assert (v["ok"], v["records"], v["problem"]) == (True, 100, None)
    records = log.records()
    assert [r["seq"] for r in records] == list(range(100))
    for w in (0, 1):
        mine = [r["query"]["i"] for r in records if r["actor"] == f"worker-{w}"]
        assert mine == list(range(50))  # each writer's records in its own order


def test_append_continues_the_chain_when_the_head_is_behind_or_gone(log):
    """Appends read only the log's tail and trust the head for the position: a crash between the log and head
    writes (head one record behind), or a lost head, must still continue the chain — verify proves it."""
    for i in range(3):
        log.append("dr-a", "read", ["p1"], {"i": i}, 1)
    one_back = log.head_path.read_bytes()
    log.append("dr-a", "read", ["p1"], {"i": 3}, 1)
    log.head_path.write_bytes(one_back)          # the crash: record 3 written, head still at 2
    assert log.append("dr-a", "read", ["p1"], {"i": 4}, 1)["seq"] == 4
    log.head_path.unlink()                       # no head at all: counted from the log
    assert log.append("dr-a", "read", ["p1"], {"i": 5}, 1)["seq"] == 5
    assert log.verify()["ok"] is True
    assert [r["seq"] for r in log.records()] == list(range(6))
