"""Pid files are trusted only for our own processes: a pid file naming someone else's process (a pid reused, a
file written by hand) is stale — never signalled — and one holding no valid pid is ignored and named; neither
stops `rpm down` or `rpm status`. A dead watchdog or Airflow supervisor is named, not hidden."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.settings import Settings
from rpmctl import services
from rpmctl.services import airflow_stack, procs, supervisor
from rpmctl.services.restarts import restarts_of
from rpmctl.views.status import render_status

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


@pytest.fixture
def s(tmp_path: Path) -> Iterator[Settings]:
    s = Settings(home=tmp_path / "var")
    procs.private_run_dir(s)
    yield s
    for name in ("a", "b", services.SERVICE):
        procs.stop(s, name, timeout=5)


@pytest.fixture
def stranger() -> Iterator[subprocess.Popen]:
    """Someone else's long-running process (`setsid sleep 3000`)."""
    proc = subprocess.Popen(["sleep", "600"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("content", ["-1", "0", "99999999999999999999", "4194305", "12abc", "\x1b[2J1"])
def test_a_pid_file_without_a_valid_pid_is_ignored_named_once_and_never_signalled(
        s: Settings, content: str, capsys: pytest.CaptureFixture[str]):
    procs.pid_file(s, "a").write_text(content + "\n")
    assert procs.recorded_pid(s, "a") is None and procs.read_pid(s, "a") is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(procs.pid_file(s, "a")) in err and "not a process id" in err
    assert "\x1b" not in err  # named with its control characters escaped

    b = procs.start(s, "b", SLEEPER)  # a bad file beside a good one: the good one is still stopped
    assert procs.stop(s, "a") is False and not procs.pid_file(s, "a").exists()
    assert procs.stop(s, "b", timeout=5) and not procs.alive(b)


def test_down_and_status_go_on_past_pid_files_holding_minus_one(s: Settings, capsys: pytest.CaptureFixture[str]):
    for name in ("mosquitto", services.INGEST, services.SERVICE, services.METRICS, supervisor.NAME,
                 airflow_stack.NAME):
        procs.pid_file(s, name).write_text("-1\n")
    st = {**services.status(s), "airflow": airflow_stack.status(s)}
    assert st["ingest_pid"] is None and st["watchdog_pid"] is None and not st["airflow"]["running"]
    assert "watchdog: not running" in render_status(st)
    assert services.down(s) == {"watchdog_stopped": False, "metrics_stopped": False, "service_stopped": False,
                                "ingest_stopped": False, "broker_stopped": False}
    assert airflow_stack.stop(s) is False
    assert list(Path(s.run_dir).glob("*.pid")) == []
    assert "airflow.pid: '-1' is not a process id" in capsys.readouterr().err


def test_a_pid_file_naming_someone_elses_process_is_stale_never_signalled_and_start_starts_ours(
        s: Settings, stranger: subprocess.Popen, capsys: pytest.CaptureFixture[str]):
    procs.pid_file(s, services.SERVICE).write_text(f"{stranger.pid}\n")
    assert procs.recorded_pid(s, services.SERVICE) == stranger.pid
    assert procs.read_pid(s, services.SERVICE) is None  # alive, but not ours: not "up"
    assert not procs.ours(s, services.SERVICE, stranger.pid)

    assert procs.stop(s, services.SERVICE, timeout=5) is False
    assert stranger.poll() is None and not procs.pid_file(s, services.SERVICE).exists()
    assert f"names pid {stranger.pid}, which is not this state folder's service" in capsys.readouterr().err

    procs.pid_file(s, services.SERVICE).write_text(f"{stranger.pid}\n")
    ours = procs.start(s, services.SERVICE, SLEEPER)  # `rpm up`: the real one starts
    assert ours != stranger.pid and procs.read_pid(s, services.SERVICE) == ours
    assert procs.ours(s, services.SERVICE, ours)
    assert not procs.ours(s, "b", ours)  # the marker names one pid file: not another component's
    assert procs.stop(s, services.SERVICE, timeout=5) and not procs.alive(ours)
    assert stranger.poll() is None


def test_another_state_folders_process_is_not_ours(s: Settings, tmp_path: Path):
    other = Settings(home=tmp_path / "other")
    procs.private_run_dir(other)
    pid = procs.start(other, "a", SLEEPER)
    try:
        procs.pid_file(s, "a").write_text(f"{pid}\n")
        assert procs.read_pid(other, "a") == pid and procs.read_pid(s, "a") is None
        assert procs.stop(s, "a") is False and procs.alive(pid)
    finally:
        procs.stop(other, "a", timeout=5)


def test_a_process_started_before_the_marker_is_recognised_by_its_command_line_and_home(s: Settings):
    """Exactly `start`'s command lines: Python running an rpmctl module with this RPM_HOME, Mosquitto with this
    state folder's config. A program that only mentions the config file or a module name is not ours."""
    from rpmctl.services import broker

    env = {k: v for k, v in {**os.environ, **s.as_env()}.items() if k != procs.OWNER_VAR}
    legacy = subprocess.Popen([sys.executable, "-m", "rpmctl.cli", "metrics"], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    broker.prepare(s)
    mimics = [subprocess.Popen(argv, env=env, start_new_session=True, stdin=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
              for argv in (["tail", "-f", str(broker.conf_path(s))], ["grep", "-r", "rpmctl.cli", "-"])]
    try:
        assert procs.ours(s, services.INGEST, legacy.pid)
        assert not procs.ours(Settings(home=Path(s.home).parent / "elsewhere"), services.INGEST, legacy.pid)
        for mimic in mimics:
            assert not procs.ours(s, broker.NAME, mimic.pid) and not procs.ours(s, services.SERVICE, mimic.pid)
    finally:
        for p in (legacy, *mimics):
            p.kill()
            p.wait()


def test_a_dead_watchdog_and_a_dead_airflow_supervisor_are_named(s: Settings):
    assert supervisor.supervision_problems(s) == []
    procs.pid_file(s, supervisor.NAME).write_text(f"{dead_pid()}\n")
    assert supervisor.supervision_problems(s) == []  # nothing wanted: `rpm up` was never (fully) run
    procs.pid_file(s, services.INGEST).write_text(f"{dead_pid()}\n")
    [problem] = supervisor.supervision_problems(s)
    assert problem.startswith("watchdog (pid ") and "`rpm up`" in problem

    airflow_stack.wanted_file(s).touch()
    procs.pid_file(s, airflow_stack.NAME).write_text(f"{dead_pid()}\n")
    problems = supervisor.supervision_problems(s)
    assert len(problems) == 2 and problems[1].startswith("Airflow supervisor (pid ")
    st = {**services.status(s), "airflow": airflow_stack.status(s)}
    assert st["airflow"]["supervisor_dead"]
    text = render_status(st)
    # Every Airflow row is shown (the supervisor DOWN), not hidden because the stack is not "running".
    rows = {line.split()[0]: line.split()[2] for line in text.splitlines()[2:] if line.startswith("airflow-")}
    assert rows == {"airflow-scheduler": "DOWN", "airflow-dag-processor": "DOWN", "airflow-api-server": "DOWN",
                    "airflow-triggerer": "DOWN", "airflow-supervisor": "DOWN"}
    assert [line for line in text.splitlines() if line.startswith("PROBLEM: ")] == [
        f"PROBLEM: {p}" for p in problems]


def test_status_text_escapes_stored_strings():
    forged = "\x1b[2J\r\nHEALTHY"
    st = {"components": {"ingest": {"pid": None, **restarts_of({}, "ingest"), "restarts_24h": 1,
                                    "last_restart": "2026-01-01T00:00:00+00:00", "last_reason": forged}},
          "airflow": {"running": False, "components": {}}, "watchdog_pid": None, "ingest_pid": None,
          "ingest": {"connected": True, "received": forged, "landed": 1, "acked": 1},
          "service_url": "https://localhost:1", "supervision_problems": [forged]}
    text = render_status(st)
    assert "\x1b" not in text and "\r" not in text
    assert not any(line.startswith("HEALTHY") for line in text.splitlines())
