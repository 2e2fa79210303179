"""The watchdog `rpm up` starts: a killed component comes back (with back-off, recorded, shown by `rpm status`)
and works; a component stopped on purpose stays stopped; `rpm down` leaves nothing running.

The Airflow supervisor's restart of a killed scheduler is tested on the real stack in test_airflow_stack.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from core.settings import Settings
from rpmctl import services
from rpmctl.services import airflow_stack, procs, supervisor
from rpmctl.services.airflow_run import seal_open_segments
from rpmctl.services.restarts import restarts
from rpmctl.services.supervisor import Component, Watchdog
from rpmctl.tools.publish import DevicePublisher, wait_until
from rpmctl.views.status import render_status
from tests.conftest import rpm, rpm_json
from tests.integration.test_ingest import add_device, sealed_records

pytestmark = pytest.mark.integration


def restart_of(s: Settings, component: str, pid_before: int) -> dict | None:
    return next((r for r in restarts(s) if r["component"] == component and r["pid_before"] == pid_before), None)


def polled_twice_more(s: Settings):
    """A predicate true once the watchdog has completed two more polls than now (one whole poll after any
    change made before this call)."""
    start = (supervisor.heartbeat(s) or {}).get("polls", 0)
    return lambda: (supervisor.heartbeat(s) or {}).get("polls", 0) >= start + 2


def test_a_killed_ingest_is_restarted_reconnects_lands_what_follows_and_down_leaves_nothing(settings: Settings):
    s = settings
    # Left behind: a pid file naming someone else's live process, one holding -1. `rpm up` starts the real
    # components, never signals the stranger, and names both files.
    stranger = subprocess.Popen(["sleep", "600"], start_new_session=True)
    procs.private_run_dir(s)
    procs.pid_file(s, services.SERVICE).write_text(f"{stranger.pid}\n")
    procs.pid_file(s, services.METRICS).write_text("-1\n")
    started = rpm(s, "up", "--json")
    up = json.loads(started.stdout)
    assert f"names pid {stranger.pid}, which is not this state folder's service" in started.stderr
    assert "metrics.pid: '-1' is not a process id" in started.stderr
    components = {"broker": up["broker_pid"], "ingest": up["ingest_pid"], "service": up["service_pid"],
                  "metrics": up["metrics_pid"]}
    assert stranger.pid not in components.values() and all(components.values())
    watchdog = up["watchdog_pid"]
    assert watchdog and procs.read_pid(s, supervisor.NAME) == watchdog
    password = add_device(s, "hr-watch")

    # Started by `rpm up`, the first ingest is not the watchdog's child: how it ended is unknown to it.
    first = components["ingest"]
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: restart_of(s, "ingest", first), 30, 0.1, what="the watchdog to restart ingest")
    entry = restart_of(s, "ingest", first)
    assert entry is not None and entry["pid_after"] and entry["error"] is None
    assert (entry["supervisor"], entry["attempt"], entry["backoff_s"]) == ("watchdog", 1, 1.0)
    # The restarted one is: its SIGKILL is recorded, and the back-off doubled (it did not stay up a minute).
    second = entry["pid_after"]
    assert procs.read_pid(s, services.INGEST) == second
    os.kill(second, signal.SIGKILL)
    wait_until(lambda: restart_of(s, "ingest", second), 30, 0.1, what="the second restart")
    entry = restart_of(s, "ingest", second)
    assert entry is not None
    assert (entry["signal"], entry["reason"], entry["attempt"], entry["backoff_s"]) == (
        "SIGKILL", "killed by SIGKILL", 2, 2.0)
    third = entry["pid_after"]

    # Reconnected and subscribed (the restart waited for that), and a reading published now is landed.
    status = services.ingest_status(s) or {}
    assert (status.get("pid"), status.get("connected"), status.get("subscribed")) == (third, True, True)
    payload = json.dumps({"msg_id": "after-restart", "metric": "heart_rate", "value": 72}).encode()
    with DevicePublisher(s, "hr-watch", password) as pub:
        pub.publish(payload)
        assert pub.wait_all() == 1
    wait_until(lambda: (services.ingest_status(s) or {}).get("landed", 0) >= 1, 20, what="ingest to land it")
    seal_open_segments(s)
    assert payload in [r.payload for r in sealed_records(s)]

    st = rpm_json(s, "status")
    assert st["ingest_pid"] == third and st["watchdog_pid"] == watchdog
    assert st["components"]["ingest"] == {"pid": third, "restarts_24h": 2, "last_restart": entry["time"],
                                          "last_reason": "killed by SIGKILL", "last_error": None}
    assert {n: c["restarts_24h"] for n, c in st["components"].items()} == {
        "broker": 0, "ingest": 2, "service": 0, "metrics": 0}
    text = rpm(s, "status").stdout
    ingest_row = next(line.split() for line in text.splitlines() if line.startswith("ingest "))
    assert ingest_row[:4] == ["ingest", str(third), "up", "2"] and "SIGKILL" in ingest_row[-1]

    # Stopped on purpose (the pid file goes with it): the watchdog leaves it stopped.
    assert procs.stop(s, services.METRICS)
    wait_until(polled_twice_more(s), 10, what="two more watchdog polls")
    assert procs.read_pid(s, services.METRICS) is None and restart_of(s, "metrics", components["metrics"]) is None

    down = rpm_json(s, "down")
    assert down["watchdog_stopped"] and down["ingest_stopped"] and down["broker_stopped"]
    assert down["service_stopped"] and not down["metrics_stopped"]
    everyone = {watchdog, first, second, third, *components.values()}
    assert [p for p in everyone if procs.alive(p)] == []
    assert sorted(p.name for p in s.run_dir.glob("*.pid")) == []  # nothing is wanted any more
    assert [r["pid_before"] for r in restarts(s)] == [first, second]
    assert stranger.poll() is None  # never signalled
    stranger.kill()
    stranger.wait()


SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]
CRASHER = [sys.executable, "-c", "import sys; sys.exit(3)"]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def dead_child(pid: int) -> bool:
    """Killed, not yet reaped: the watchdog's own wait must be the one that learns how it ended."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_the_watchdog_waits_its_back_off_retries_a_failing_start_and_respects_a_stop(settings: Settings):
    """One Watchdog driven poll by poll on a clock the test moves, over a real process."""
    s = settings
    argv = {"cmd": SLEEPER}  # the crasher never gets ready: it exits while starting
    component = Component("sleeper", "sleeper", lambda s: procs.start(s, "sleeper", argv["cmd"],
                                                                       ready=lambda: argv["cmd"] is SLEEPER))
    clock = Clock()
    dog = Watchdog(s, [component], clock=clock)
    pid = component.start(s)
    dog.poll()
    assert restarts(s) == []

    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: dead_child(pid), 10, what="the sleeper to die")
    clock.now = 0.5
    dog.poll()  # noticed; waits out its 1 s back-off
    assert restarts(s) == [] and procs.recorded_pid(s, "sleeper") == pid
    clock.now = 1.5
    dog.poll()
    [entry] = restarts(s)
    assert (entry["pid_before"], entry["signal"], entry["attempt"], entry["backoff_s"]) == (pid, "SIGKILL", 1, 1.0)
    assert procs.read_pid(s, "sleeper") == entry["pid_after"]

    # The start fails from now on (the process exits while starting): tried again, each time after a longer
    # back-off, and the component stays wanted (its pid file names the dead process) however long it fails.
    argv["cmd"] = CRASHER
    crashed = entry["pid_after"]
    os.kill(crashed, signal.SIGKILL)
    wait_until(lambda: dead_child(crashed), 10, what="the sleeper to die")
    for _ in range(8):
        clock.now += 0.5
        dog.poll()  # noticed, or not yet due
        clock.now += 61
        dog.poll()  # due: at most a minute after the last try
    failed = restarts(s)[1:]
    assert [r["backoff_s"] for r in failed] == [2, 4, 8, 16, 32, 60, 60, 60]
    assert all(r["pid_after"] is None and "exited with 3" in r["error"] for r in failed)
    assert [r["attempt"] for r in failed] == list(range(2, 10))
    assert procs.recorded_pid(s, "sleeper") == crashed and procs.read_pid(s, "sleeper") is None

    # The operator stops it meanwhile (`rpm down` would): no further attempt, however long the watchdog polls.
    assert procs.stop(s, "sleeper") is False  # it was not running, but it is no longer wanted either
    for _ in range(3):
        clock.now += 61
        dog.poll()
    assert len(restarts(s)) == 9 and procs.recorded_pid(s, "sleeper") is None

    # Started again, up for a minute: its next crash is a first one again (1 s).
    argv["cmd"] = SLEEPER
    pid = component.start(s)
    dog.poll()
    clock.now += 60
    dog.poll()
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: dead_child(pid), 10, what="the sleeper to die")
    dog.poll()
    clock.now += 1
    dog.poll()
    assert restarts(s)[-1]["pid_before"] == pid and restarts(s)[-1]["backoff_s"] == 1.0
    procs.stop(s, "sleeper")


def test_the_watchdog_keeps_the_airflow_supervisor_up_only_while_wanted_and_replaces_a_stranger(
        settings: Settings):
    """The Airflow supervisor is watched while `rpm up --airflow` wants it (run/airflow.wanted); a pid file that
    names someone else's live process counts as a crash: the component is started, the stranger left alone."""
    s = settings
    [watched] = [c for c in supervisor.watched_components() if c.proc_name == airflow_stack.NAME]
    assert (watched.name, watched.start, watched.wanted) == (
        "airflow-supervisor", airflow_stack.restart, airflow_stack.wanted)
    # The real stack takes a minute to start: a sleeper stands in for it, behind the same wanted gate.
    component = Component(watched.name, "fake-airflow", lambda s: procs.start(s, "fake-airflow", SLEEPER),
                          airflow_stack.wanted)
    clock = Clock()
    dog = Watchdog(s, [component], clock=clock)
    pid = component.start(s)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: dead_child(pid), 10, what="the stand-in to die")
    for _ in range(2):
        dog.poll()
        clock.now += 61
    assert restarts(s) == []  # not wanted: `rpm up --airflow` never ran, or `rpm down` stopped it

    airflow_stack.wanted_file(s).touch()
    dog.poll()
    clock.now += 1
    dog.poll()
    [entry] = restarts(s)
    assert (entry["component"], entry["pid_before"]) == ("airflow-supervisor", pid)
    assert procs.read_pid(s, "fake-airflow") == entry["pid_after"]

    assert procs.stop(s, "fake-airflow")
    stranger = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        procs.pid_file(s, "fake-airflow").write_text(f"{stranger.pid}\n")
        dog.poll()
        clock.now += 2  # the back-off after one restart
        dog.poll()
        last = restarts(s)[-1]
        assert last["pid_before"] == stranger.pid and last["pid_after"] not in (None, stranger.pid)
        assert procs.read_pid(s, "fake-airflow") == last["pid_after"] and stranger.poll() is None
    finally:
        procs.stop(s, "fake-airflow", timeout=10)
        stranger.kill()
        stranger.wait()


FAKE_STACK = """
import json, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
json.dump({"scheduler": child.pid}, open(sys.argv[1] + ".tmp", "w"))
__import__("os").replace(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(600)
"""


def test_a_dead_airflow_supervisor_is_shown_with_what_it_left_running_and_stop_ends_that(settings: Settings):
    """kill -9 of the Airflow supervisor leaves its components running unsupervised: `rpm status` shows them
    and names the dead supervisor (instead of hiding the rows), and stopping the stack ends them."""
    s = settings
    Path(s.airflow_home).mkdir(parents=True, exist_ok=True)
    components = airflow_stack.components_file(s)
    leader = procs.start(s, airflow_stack.NAME, [sys.executable, "-c", FAKE_STACK, str(components)],
                         env={"AIRFLOW_HOME": str(s.airflow_home)}, ready=components.exists)
    airflow_stack.wanted_file(s).touch()
    orphan = airflow_stack.component_pids(s)["scheduler"]
    os.kill(leader, signal.SIGKILL)
    wait_until(lambda: not procs.alive(leader), 10, what="the supervisor to die")

    st = airflow_stack.status(s)
    assert (st["running"], st["supervisor_dead"]) == (False, True)
    assert st["components"]["airflow-scheduler"]["pid"] == orphan
    assert st["components"]["airflow-supervisor"]["pid"] is None
    [problem] = supervisor.supervision_problems(s)
    assert problem.startswith(f"Airflow supervisor (pid {leader}) is not running")
    text = render_status({**services.status(s), "airflow": st})
    rows = {line.split()[0]: line.split()[1:3] for line in text.splitlines() if line.startswith("airflow-")}
    assert rows["airflow-scheduler"] == [str(orphan), "up"] and rows["airflow-supervisor"] == ["-", "DOWN"]
    assert f"PROBLEM: {problem}" in text

    assert airflow_stack.stop(s, timeout=10)
    wait_until(lambda: not airflow_stack.is_running(orphan), 10, what="the orphan to end")
    assert supervisor.supervision_problems(s) == [] and not procs.pid_file(s, airflow_stack.NAME).exists()


def test_the_systemd_units_airflow_entry_point_migrates_and_names_its_components(settings: Settings):
    """deploy/systemd's Airflow units run `python -m rpmctl.services.airflow_stack <component>`: migrate is
    one of them (before the others), and a name that is not a component is refused with the list."""
    env = {**os.environ, **settings.as_env()}
    module = [sys.executable, "-m", "rpmctl.services.airflow_stack"]
    done = subprocess.run([*module, "migrate"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (settings.airflow_home / "airflow.db").stat().st_size > 0
    wrong = subprocess.run([*module, "schedular"], env=env, capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2
    assert wrong.stderr.strip() == ("usage: python -m rpmctl.services.airflow_stack "
                                    "[scheduler | dag-processor | api-server | triggerer | migrate | clean]")
