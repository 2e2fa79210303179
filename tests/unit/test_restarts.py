"""The restart policy and log both supervisors share: the back-off an operator can expect, and what `rpm status`
and `rpm ops status` read back."""

from __future__ import annotations

import json
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

from core.settings import Settings
from rpmctl.services import restarts
from rpmctl.services.restarts import Backoff, describe_exit, record, restart_summary


def test_the_back_off_doubles_from_one_second_to_a_minute_and_starts_again_after_a_stable_minute():
    b = Backoff()
    delays = []
    for _ in range(9):
        delays.append(b.delay())
        b.restarted()
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]  # a component that keeps crashing: once a minute
    b.stayed_up(59.9)
    assert b.delay() == 60
    b.stayed_up(60.0)
    assert b.delay() == 1


def test_how_a_process_ended_is_said_in_words():
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(3) == "exited with 3"
    assert describe_exit(None).startswith("ended (exit status unknown")


def test_restarts_are_read_back_oldest_first_and_summarised_per_component(tmp_path: Path):
    s = Settings(home=tmp_path / "var")
    Path(s.run_dir).mkdir(parents=True)
    record(s, "ingest", "watchdog", 10, 11, None, 1, 1.0)
    record(s, "airflow-scheduler", "airflow", 20, 21, -signal.SIGKILL, 1, 1.0)
    record(s, "ingest", "watchdog", 11, None, -signal.SIGKILL, 2, 2.0, error="StartError: ingest exited with 1")
    log = restarts.log_path(s)
    assert oct(log.stat().st_mode & 0o777) == "0o600"  # beside the services' logs, as private
    # A record older than the 24 h window, and a line a full disk cut short.
    old = {**json.loads(log.read_text().splitlines()[0]),
           "time": (datetime.now(UTC) - timedelta(hours=25)).isoformat()}
    log.write_text(json.dumps(old) + "\n" + log.read_text() + '{"time": "2026-')

    everything = restarts.restarts(s)
    assert [(r["component"], r["pid_before"]) for r in everything] == [
        ("ingest", 10), ("ingest", 10), ("airflow-scheduler", 20), ("ingest", 11)]
    assert everything[3] | {"time": None} == {
        "time": None, "component": "ingest", "supervisor": "watchdog", "pid_before": 11, "pid_after": None,
        "exit_code": None, "signal": "SIGKILL", "reason": "killed by SIGKILL", "attempt": 2, "backoff_s": 2.0,
        "error": "StartError: ingest exited with 1"}
    recent = restarts.restarts(s, since=datetime.now(UTC) - timedelta(hours=1))
    assert len(recent) == 3

    summary = restart_summary(s)
    assert summary == {
        "ingest": {"restarts_24h": 2, "last_restart": everything[3]["time"], "last_reason": "killed by SIGKILL",
                   "last_error": "StartError: ingest exited with 1"},
        "airflow-scheduler": {"restarts_24h": 1, "last_restart": everything[2]["time"],
                              "last_reason": "killed by SIGKILL", "last_error": None}}
    assert restarts.restarts_of(summary, "broker") == {"restarts_24h": 0, "last_restart": None,
                                                      "last_reason": None, "last_error": None}


def test_a_crash_loop_keeps_the_log_bounded_with_the_newest_records(tmp_path: Path):
    """Ten days of a component crashing once a minute (the maximum back-off) fit in two small files."""
    s = Settings(home=tmp_path / "var")
    Path(s.run_dir).mkdir(parents=True)
    n = 10 * 24 * 60
    for i in range(n):
        record(s, "broker", "watchdog", i, i + 1, None, i + 1, 60.0)
    log = restarts.log_path(s)
    assert log.stat().st_size <= restarts.LOG_MAX_BYTES + 400
    assert log.with_name(log.name + ".1").exists() and not log.with_name(log.name + ".2").exists()
    kept = restarts.restarts(s)
    assert len(kept) > 3000 and [r["pid_before"] for r in kept] == list(range(n - len(kept), n))


def test_lines_that_are_not_records_are_skipped_by_every_reader(tmp_path: Path):
    """A line without a component, a time without its zone, a field of the wrong type, a byte that is not
    UTF-8: skipped — `rpm status` and `rpm ops status` read the log and must not fail on it."""
    s = Settings(home=tmp_path / "var")
    Path(s.run_dir).mkdir(parents=True)
    now = datetime.now(UTC)
    record(s, "ingest", "watchdog", 10, 11, None, 1, 1.0)
    good = json.loads(restarts.log_path(s).read_text())
    bad = [{"time": now.isoformat()},  # no component
           {**good, "time": now.replace(tzinfo=None).isoformat()},  # naive
           {**good, "component": ["ingest"]}, {**good, "component": {"x": 1}}, {**good, "component": ""},
           {**good, "reason": ["killed"]}, {**good, "error": {"a": 1}}, {**good, "pid_before": "10"},
           {**good, "attempt": True}, {**good, "time": 12345}, {**good, "time": "yesterday"}, [good], "x", 1e999]
    with restarts.log_path(s).open("ab") as f:
        f.write(b"".join(json.dumps(b).encode() + b"\n" for b in bad))
        f.write(b'{"time": "' + now.isoformat().encode() + b'", "component": "\xff"}\n' + b"[" * 100_000 + b"\n")
    assert restarts.restarts(s) == [good]
    assert restarts.restarts(s, since=now - timedelta(hours=1)) == [good]
    assert restart_summary(s) == {"ingest": {"restarts_24h": 1, "last_restart": good["time"],
                                             "last_reason": good["reason"], "last_error": None}}
