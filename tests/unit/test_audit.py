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

from core.keyring import DecryptError, Keyring
from core.settings import Settings
from warehouse import audit as audit_mod
from warehouse.audit import GENESIS, AuditLog, AuditTampered

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


def test_an_instance_loaded_before_a_rotation_keeps_appending_under_the_new_key(log, settings):
    """A long-lived reader's AuditLog outlives `rpm keys rotate` in another process: its next append must
    authenticate the re-sealed tail (not call it tampered) and seal under the new key."""
    fill(log, 2)
    rotating = AuditLog(settings)
    old = set(rotating.keyring.keys)
    new_kid = rotating.keyring.add_active()
    rotating.reencrypt()
    rotating.keyring.retire(old)
    assert log.append(ACTOR, "patient", [PATIENTS[0]], {}, rows=1)["seq"] == 2
    assert Keyring.key_id_of(base64.b64decode(lines(log)[-1])) == new_kid
    assert AuditLog(settings).verify()["ok"] is True


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


# --- the tail is anchored at the head ------------------------------------------------------------------------


def refused_every_time(log: AuditLog, attempts: int = 3) -> None:
    """However many reads follow the tampering, none is recorded, none repairs the chain, verify keeps saying
    so, and the ops check sees it too."""
    before = log.path.read_bytes() if log.path.exists() else None
    for i in range(attempts):
        with pytest.raises(AuditTampered):
            log.append(ACTOR, "patient", [PATIENTS[0]], {"after": i}, rows=1)
        with pytest.raises(AuditTampered):  # another process, same state folder
            AuditLog(Settings(home=log.dir.parent)).append(ACTOR, "patients", [], {}, rows=0)
    assert (log.path.read_bytes() if log.path.exists() else None) == before
    assert log.verify()["ok"] is False
    assert log.check() is not None


def test_truncating_the_newest_records_is_reported_however_many_reads_follow(log):
    fill(log, 5)
    write_lines(log, lines(log)[:-2])
    refused_every_time(log)
    assert "removed from the end" in log.verify()["problem"]


def test_emptying_the_log_is_reported_however_many_reads_follow(log):
    fill(log, 3)
    log.path.write_bytes(b"")
    refused_every_time(log)
    assert log.verify()["records"] == 0


def test_deleting_the_log_file_is_reported(log):
    fill(log, 3)
    log.path.unlink()
    refused_every_time(log)


def test_deleting_the_head_is_reported_however_many_reads_follow(log):
    fill(log, 3)
    log.head_path.unlink()
    refused_every_time(log)
    assert "head" in log.verify()["problem"]


def test_the_head_exists_from_the_moment_the_key_does(log):
    """Otherwise deleting the head and emptying the log would look like a log nobody has read yet."""
    assert log.head_path.exists() and log.check() is None
    log.head_path.unlink()
    refused_every_time(log)


def test_a_foreign_line_at_the_end_is_refused(log, tmp_path):
    fill(log, 3)
    other = AuditLog(Settings(home=tmp_path / "other"))
    fill(other, 4)
    write_lines(log, [*lines(log), lines(other)[3]])
    refused_every_time(log)


def test_a_crash_between_the_log_and_head_writes_is_completed_by_the_next_append(log):
    records = fill(log, 3)
    behind, anchor = log.head_path.read_bytes(), log.anchor_path.read_bytes()
    crashed = log.append(ACTOR, "patient", [PATIENTS[0]], {"i": 3}, rows=1)
    log.head_path.write_bytes(behind)            # the crash: record 3 written, head (and anchor) still at 2
    log.anchor_path.write_bytes(anchor)
    assert log.check() is None
    assert log.verify()["ok"] is True and log.verify()["records"] == 4
    nxt = log.append(ACTOR, "patient", [PATIENTS[0]], {"i": 4}, rows=1)
    assert (nxt["seq"], nxt["prev"]) == (4, crashed["mac"])
    v = log.verify()
    assert (v["ok"], v["records"], v["head"]) == (True, 5, {"seq": 4, "mac": nxt["mac"]})
    assert [r["seq"] for r in log.records()] == list(range(5))
    assert records[2]["mac"] == crashed["prev"]


def test_a_crash_before_the_first_head_write_is_completed_too(log):
    genesis, anchor = log.head_path.read_bytes(), log.anchor_path.read_bytes()
    log.append(ACTOR, "patient", [PATIENTS[0]], {}, rows=1)
    log.head_path.write_bytes(genesis)
    log.anchor_path.write_bytes(anchor)
    assert log.append(ACTOR, "patient", [PATIENTS[0]], {}, rows=1)["seq"] == 1
    assert log.verify()["ok"] is True


def test_a_torn_last_line_after_the_head_is_dropped(log):
    """A write that never got its newline never returned: the read it recorded was not served."""
    fill(log, 3)
    intact = log.path.read_bytes()
    torn = lines(log)[1][:40]                     # the start of a line, no newline
    log.path.write_bytes(intact + torn)
    assert log.check() is None
    assert log.verify()["ok"] is True and len(log.records()) == 3
    assert log.append(ACTOR, "patient", [PATIENTS[0]], {}, rows=1)["seq"] == 3
    assert log.path.read_bytes().startswith(intact) and torn not in log.path.read_bytes()[len(intact):]
    assert log.verify()["ok"] is True and log.verify()["records"] == 4


def test_a_newline_removed_from_the_last_record_is_not_mistaken_for_a_torn_write(log):
    fill(log, 3)
    log.path.write_bytes(log.path.read_bytes()[:-1])  # record 2 now looks torn, but the head names it
    refused_every_time(log)


def test_os_user_comes_from_the_kernel_not_the_environment(log, monkeypatch):
    import os
    import pwd

    monkeypatch.setenv("LOGNAME", "dr-impostor")
    monkeypatch.setenv("USER", "dr-impostor")
    r = log.append(ACTOR, "patient", [PATIENTS[0]], {}, rows=1)
    assert r["os_user"] == pwd.getpwuid(os.getuid()).pw_name != "dr-impostor"


def test_the_audit_folder_and_files_are_owner_only(settings):
    import os
    import stat

    folder = settings.home / "audit"
    folder.mkdir(parents=True)
    os.chmod(folder, 0o755)  # as an older version left it
    old_umask = os.umask(0o022)
    try:
        log = AuditLog(settings)
        fill(log, 2)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for path in (log.path, log.head_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name


def test_restoring_an_older_copy_of_the_log_and_its_head_is_reported(log, tmp_path):
    """A rollback that hides the newest reads: both files put back as they were a few reads ago."""
    for i in range(3):
        log.append("dr-a", "patient", [f"pt-{i}"], {}, 1)
    saved = {p.name: p.read_bytes() for p in (log.path, log.head_path)}
    for i in range(2):
        log.append("dr-a", "patient", [f"pt-later-{i}"], {}, 1)
    for name, data in saved.items():
        (log.dir / name).write_bytes(data)
    result = log.verify()
    assert not result["ok"] and "rolled back" in result["problem"]
    with pytest.raises(AuditTampered, match="rolled back"):
        log.append("dr-a", "patient", ["pt-x"], {}, 1)
    assert log.check() is not None


def test_a_failed_sync_leaves_the_head_at_the_last_durable_record(log, monkeypatch):
    """The record and its head are synced together, the head renamed only after both: a sync that fails (a
    disk error; a crash at that point likewise) leaves the head naming the record before, so the read is
    refused, and the line that may have reached the log is the crash case the next append rolls forward."""
    records = fill(log, 3)
    real_fsync = audit_mod.os.fsync

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(audit_mod.os, "fsync", failing)
    with pytest.raises(OSError):
        log.append(ACTOR, "patient", [PATIENTS[0]], {"i": 3}, rows=1)
    monkeypatch.setattr(audit_mod.os, "fsync", real_fsync)
    head = json.loads(log.head_path.read_text())
    assert (head["seq"], head["mac"]) == (2, records[2]["mac"])
    nxt = log.append(ACTOR, "patient", [PATIENTS[0]], {"i": 4}, rows=1)
    assert nxt["seq"] == 4 and log.verify()["ok"] is True


def test_an_anchor_a_crash_left_empty_counts_as_none_and_is_written_again(log, tmp_path):
    """The anchor is written without a sync of its own: a crash can leave it empty (a rename committed before
    its data). Reads go on, as with no anchor, and the next append restores the rollback check."""
    fill(log, 3)
    saved = {p.name: p.read_bytes() for p in (log.path, log.head_path)}
    log.anchor_path.write_bytes(b"")
    assert log.check() is None and log.verify()["ok"] is True
    for i in range(2):
        log.append("dr-a", "patient", [f"pt-later-{i}"], {}, 1)
    assert json.loads(log.anchor_path.read_text())["seq"] == 4
    for name, data in saved.items():
        (log.dir / name).write_bytes(data)
    assert "rolled back" in log.verify()["problem"]

# --- the whole chain is checked on every append, at the cost of what was appended since -----------------------
# (the hostile review: `sed -i '10d' audit.log` left `verify` failing but every read served)


def as_new_process() -> None:
    """What a process that has not looked at any log yet knows: nothing (marks in audit.verified aside)."""
    audit_mod._verified.clear()
    audit_mod._tampered.clear()


def edited_in_place(log: AuditLog, index: int) -> None:
    """One base64 character of line ``index`` changed where it lies: same file, same size."""
    offset = sum(len(line) + 1 for line in lines(log)[:index]) + len(lines(log)[index]) // 2
    with open(log.path, "r+b") as f:
        f.seek(offset)
        c = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([_flip(c)]))


@pytest.mark.parametrize("tamper", ["delete line 10", "edit in place", "swap two lines", "delete, then restore"])
def test_a_record_altered_in_the_middle_refuses_every_read(log, tamper):
    fill(log, 15)  # this process has verified the log and appended to it: its mark is warm
    original, ls = log.path.read_bytes(), lines(log)
    if tamper == "delete line 10":
        write_lines(log, ls[:9] + ls[10:])
    elif tamper == "edit in place":
        inode = log.path.stat().st_ino
        edited_in_place(log, 6)
        assert (log.path.stat().st_ino, log.path.stat().st_size) == (inode, len(original))
    elif tamper == "swap two lines":
        ls[4], ls[5] = ls[5], ls[4]
        write_lines(log, ls)
    else:
        write_lines(log, ls[:9] + ls[10:])
        with pytest.raises(AuditTampered):
            log.append(ACTOR, "patient", [PATIENTS[0]], {}, rows=1)
        log.path.write_bytes(original)  # the evidence removed again: this process does not forget
    refused_every_time(log)  # this process, a second instance in it, check() and verify() all see it
    assert "found earlier by this process" in log.check()
    assert log.path.read_bytes() == (original if tamper == "delete, then restore" else log.path.read_bytes())
    as_new_process()
    if tamper == "delete, then restore":
        assert log.append(ACTOR, "patient", [PATIENTS[0]], {}, rows=1)["seq"] == 15  # restarted: intact again
    else:
        refused_every_time(log)


def test_the_middle_is_checked_in_a_new_process_too(log):
    fill(log, 12)
    ls = lines(log)
    write_lines(log, ls[:9] + ls[10:])
    as_new_process()
    problem = log.check()
    assert problem is not None and "line 10" in problem
    with pytest.raises(AuditTampered, match="line 10"):
        AuditLog(Settings(home=log.dir.parent)).append(ACTOR, "patients", [], {}, rows=0)


def test_a_warm_process_authenticates_nothing_again_for_its_own_appends(log, monkeypatch):
    fill(log, 10)
    seen = spy_authenticate(monkeypatch)
    fill(log, 5)
    assert seen == []
    assert log.verify()["ok"] is True


def spy_authenticate(monkeypatch) -> list[int]:
    seen: list[int] = []
    real = AuditLog._authenticate

    def spy(self, line, seq, prev):
        seen.append(seq)
        return real(self, line, seq, prev)

    monkeypatch.setattr(AuditLog, "_authenticate", spy)
    return seen


def _append_in_child(home: str, n: int) -> None:
    fill(AuditLog(Settings(home=Path(home))), n)


def test_records_another_process_appended_are_the_only_ones_authenticated(log, settings, monkeypatch):
    fill(log, 10)
    child = multiprocessing.get_context("fork").Process(target=_append_in_child, args=(str(settings.home), 3))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    seen = spy_authenticate(monkeypatch)
    assert log.append(ACTOR, "patient", [PATIENTS[0]], {}, rows=1)["seq"] == 13
    assert seen == [10, 11, 12]  # the prefix was hashed, not decrypted again


def test_a_new_process_starts_from_the_mark_in_audit_verified(log, monkeypatch):
    monkeypatch.setattr(audit_mod, "PERSIST_EVERY_BYTES", 0)  # every append leaves its mark
    fill(log, 10)
    mark = json.loads(log.verified_path.read_bytes())
    assert (mark["seq"], mark["offset"]) == (9, log.path.stat().st_size)
    assert oct(log.verified_path.stat().st_mode & 0o777) == "0o600"
    as_new_process()
    seen = spy_authenticate(monkeypatch)
    assert log.append(ACTOR, "patient", [PATIENTS[0]], {}, rows=1)["seq"] == 10
    assert seen == []


@pytest.mark.parametrize("forgery", ["removed", "offset moved", "garbage", "another file"])
def test_a_forged_or_missing_mark_only_costs_a_walk_from_the_start(log, monkeypatch, forgery):
    monkeypatch.setattr(audit_mod, "PERSIST_EVERY_BYTES", 0)
    fill(log, 8)
    mark = json.loads(log.verified_path.read_bytes())
    if forgery == "removed":
        log.verified_path.unlink()
    elif forgery == "offset moved":  # claims the whole log is verified, after the last line was deleted
        write_lines(log, lines(log)[:3] + lines(log)[4:])
        log.verified_path.write_text(json.dumps({**mark, "offset": log.path.stat().st_size, "seq": 6}))
    elif forgery == "garbage":
        log.verified_path.write_bytes(b"\x00not json")
    else:
        log.verified_path.write_text(json.dumps({**mark, "ino": mark["ino"] + 1}))
    as_new_process()
    seen = spy_authenticate(monkeypatch)
    if forgery == "offset moved":
        with pytest.raises(AuditTampered, match="line 4"):
            log.append(ACTOR, "patient", [PATIENTS[0]], {}, rows=1)
    else:
        assert log.append(ACTOR, "patient", [PATIENTS[0]], {}, rows=1)["seq"] == 8
        assert seen[:8] == list(range(8))


def test_an_edit_the_file_times_cannot_show_is_found_by_the_periodic_hash(log, monkeypatch):
    """Size, mtime and ctime unchanged (an edit within one tick of the clock): the prefix is hashed again at
    least every REHASH_EVERY_S."""
    fill(log, 6)
    edited_in_place(log, 2)
    st = log.path.stat()
    mark = audit_mod._verified[log.path]
    mark.times = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)  # as if the edit left the times as they were
    assert log.check() is None  # within the interval, the times are trusted
    mark.hashed_at -= audit_mod.REHASH_EVERY_S
    assert "line 3" in log.check()


def test_ops_status_is_failing_when_a_middle_record_is_gone(log, settings):
    from rpmctl.views.ops import ops_status

    fill(log, 12)
    assert not any("audit log" in r for r in ops_status(settings)["reasons"])
    ls = lines(log)
    write_lines(log, ls[:9] + ls[10:])
    as_new_process()  # ops status is another process than the one that wrote
    status = ops_status(settings)
    assert status["verdict"] == "failing"
    assert any(r.startswith("audit log: line 10") for r in status["reasons"]), status["reasons"]


def _append_until(home: str, stop) -> None:
    log = AuditLog(Settings(home=Path(home)))
    i = 0
    while not stop.is_set():
        log.append("dr-busy", "patient", [PATIENTS[i % 2]], {"i": i}, rows=1)
        i += 1


def test_verify_during_appends_by_another_process_finds_nothing_wrong(settings):
    """`rpm audit verify` (and `rpm ops status`) while the service audits reads: the head, the log and the
    anchor are one state, read together. (The hostile review: the anchor was read after the lock was let go,
    so an append in between made it newer than the head just read — a rollback reported on an intact log,
    and the verifying process then refused every read of PHI.)"""
    fill(AuditLog(settings), 3)
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    writer = ctx.Process(target=_append_until, args=(str(settings.home), stop))
    writer.start()
    try:
        log = AuditLog(settings)
        problems = [v["problem"] for v in (log._verify() for _ in range(300)) if not v["ok"]]
    finally:
        stop.set()
        writer.join(timeout=60)
    assert writer.exitcode == 0
    assert problems == []
