"""The watchdog `rpm up` starts: it brings back a crashed broker, ingest service, clinician service or metrics
exporter — and the Airflow supervisor while `rpm up --airflow` wants the stack — with back-off, and records
each restart.

`rpm up` starts every component detached and returns, so no parent is left to notice one dying. The watchdog
is a small process of its own (pid file ``run/watchdog.pid``, log ``run/watchdog.log``) that polls each
component's pid file every second. The pid file is the operator's intent (rpmctl/services/procs.py): a
component whose pid file names a dead process crashed and is restarted through the same start function `rpm
up` uses; one without a pid file was stopped on purpose (`rpm down`, ``procs.stop``) and is left alone. The
check is repeated under the component's lock right before the restart, so a stop that raced the poll wins.
A pid file naming a live process that is not ours (procs.ours: the pid reused) counts as a crash too.
`rpm down` stops the watchdog before anything else. Nothing restarts the watchdog itself: `rpm status` and
`supervision_problems` name a dead one.

The wait before a restart follows restarts.Backoff (1 s doubling to 60 s). A restart that fails (the
component exits again while starting, or never becomes ready) is recorded with its error and tried again after
the next back-off; its pid file is put back so it stays wanted. The watchdog runs as the account that ran `rpm
up` (the service account when root started it), and so does everything it restarts.

On a server, systemd does this job instead (deploy/systemd/: Restart=on-failure per unit).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

from core.settings import Settings
from rpmctl.services import procs
from rpmctl.services.restarts import Backoff, describe_exit, record

NAME = "watchdog"
POLL_S = 1.0


class Component(NamedTuple):
    name: str  # as `rpm status` and the restart log show it
    proc_name: str  # its pid file and log under run_dir
    start: Callable[[Settings], int | None]  # what `rpm up` calls: starts it, waits until ready, returns the pid
    wanted: Callable[[Settings], bool] | None = None  # besides its pid file (the Airflow stack: airflow.wanted)


def local_components() -> list[Component]:
    """What `rpm up` starts, in its order: the broker first (ingest and its restarts need it)."""
    from rpmctl import services  # the package imports this module
    from rpmctl.services import broker

    return [
        Component("broker", broker.NAME, broker.start),
        Component("ingest", services.INGEST, services.start_ingest),
        Component("service", services.SERVICE, services.start_service),
        Component("metrics", services.METRICS, services.start_metrics),
    ]


def watched_components() -> list[Component]:
    """What the watchdog keeps up: `rpm up`'s components, and the Airflow stack's supervisor while `rpm up
    --airflow` wants it (the supervisor restarts the stack's own components)."""
    from rpmctl.services import airflow_stack

    return [*local_components(),
            Component(airflow_stack.WATCHDOG_NAME, airflow_stack.NAME, airflow_stack.restart, airflow_stack.wanted)]


@dataclass
class _Watch:
    """What the watchdog knows of one component between polls."""

    backoff: Backoff = field(default_factory=Backoff)
    up_pid: int | None = None  # the running process last seen, and since when (monotonic seconds)
    up_since: float = 0.0
    down_pid: int | None = None  # the dead process the pid file names, and since when
    down_since: float = 0.0
    returncode: int | None = None  # how it ended, when it was our child


class Watchdog:
    """Restarts dead components; one `poll()` checks each once (the clock is injectable for tests)."""

    def __init__(self, s: Settings, components: list[Component],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.s, self.components, self.clock = s, components, clock
        self.watches = {c.name: _Watch() for c in components}

    def poll(self) -> None:
        for c in self.components:
            self._check(c, self.watches[c.name])

    def _check(self, c: Component, w: _Watch) -> None:
        now = self.clock()
        pid = procs.recorded_pid(self.s, c.proc_name)
        if pid is None or (c.wanted is not None and not c.wanted(self.s)):
            self.watches[c.name] = _Watch(backoff=w.backoff)  # stopped on purpose, or never started: left alone
            return
        dead, returncode = _ended(self.s, c.proc_name, pid)
        if not dead:
            if pid != w.up_pid:
                w.up_pid, w.up_since = pid, now
            w.backoff.stayed_up(now - w.up_since)
            w.down_pid = None
            return
        if pid != w.down_pid:
            w.down_pid, w.down_since, w.returncode = pid, now, returncode
            _say(f"{c.name} (pid {pid}) {describe_exit(returncode)}; restarting in {w.backoff.delay():g} s")
        if now - w.down_since >= w.backoff.delay():
            self._restart(c, w)

    def _restart(self, c: Component, w: _Watch) -> None:
        with procs.lock(self.s, c.proc_name):
            if procs.recorded_pid(self.s, c.proc_name) != w.down_pid or procs.read_pid(self.s, c.proc_name):
                return  # stopped or started by someone else meanwhile: the next poll sees which
            delay, error, new_pid = w.backoff.delay(), None, None
            try:
                new_pid = c.start(self.s)
            except Exception as exc:  # whatever a start raises, the watchdog goes on
                error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                # Still wanted: put the crashed pid back so the next poll tries again after the next back-off.
                procs.pid_file(self.s, c.proc_name).write_text(f"{w.down_pid}\n")
            w.backoff.restarted()
            entry = record(self.s, c.name, NAME, w.down_pid, new_pid, w.returncode, w.backoff.attempt, delay,
                           error)
        if new_pid is None:
            _say(f"{c.name}: restart failed ({error}); next try in {w.backoff.delay():g} s")
            w.down_since, w.returncode = self.clock(), None
        else:
            _say(f"{c.name}: restarted as pid {new_pid} (attempt {entry['attempt']})")
            w.down_pid, w.up_pid, w.up_since = None, new_pid, self.clock()


def _ended(s: Settings, proc_name: str, pid: int) -> tuple[bool, int | None]:
    """(dead, how it ended): the return code is known only for our own children (those we restarted). A live
    process that is not ours is dead for this purpose: the pid was reused."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child
        done = status = 0
    if done:
        return True, os.waitstatus_to_exitcode(status)
    return not (procs.alive(pid) and procs.ours(s, proc_name, pid)), None


def _say(line: str) -> None:
    print(f"{datetime.now(UTC).isoformat(timespec='seconds')} rpm watchdog: {line}", flush=True)


# --- the watchdog process --------------------------------------------------------------------------------

def heartbeat_path(s: Settings) -> Path:
    return Path(s.run_dir) / f"{NAME}.json"


def heartbeat(s: Settings) -> dict | None:
    """What the running watchdog last wrote: its pid, when it started, how many polls, the last one's time."""
    try:
        return json.loads(heartbeat_path(s).read_text())
    except (FileNotFoundError, ValueError):
        return None


def _beat(s: Settings, started_at: str, polls: int) -> None:
    path = heartbeat_path(s)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "started_at": started_at, "polls": polls,
                               "checked_at": datetime.now(UTC).isoformat(timespec="milliseconds")}))
    os.replace(tmp, path)


def run(s: Settings) -> int:
    """Poll until SIGTERM or SIGINT."""
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda _signum, _frame: stopping.set())
    dog = Watchdog(s, watched_components())
    started_at, polls = datetime.now(UTC).isoformat(timespec="seconds"), 0
    _say(f"watching {', '.join(c.name for c in dog.components)}")
    while True:
        dog.poll()
        polls += 1
        _beat(s, started_at, polls)
        if stopping.wait(POLL_S):
            break
    _say("stopped")
    return 0


def start(s: Settings) -> int:
    """Start the watchdog in the background (idempotent); returns once it has polled every component."""
    def ready() -> bool:
        beat = heartbeat(s)
        return bool(beat and beat["pid"] == procs.read_pid(s, NAME))

    return procs.start(s, NAME, [sys.executable, "-m", "rpmctl.services.supervisor"], env=s.as_env(),
                       ready=ready)


def stop(s: Settings) -> bool:
    """Stop the watchdog (a restart it is in the middle of completes first). True if it was running."""
    stopped = procs.stop(s, NAME)
    heartbeat_path(s).unlink(missing_ok=True)
    return stopped


def supervision_problems(s: Settings) -> list[str]:
    """What nothing supervises any more, one line each: a dead watchdog while `rpm up`'s components are
    wanted (a crash of one stays down), a dead Airflow supervisor while `rpm up --airflow` wants the stack
    (its components run unsupervised, or not at all). Empty when all is watched."""
    from rpmctl.services import airflow_stack

    out = []
    watchdog = procs.read_pid(s, NAME)
    dead_dog = procs.recorded_pid(s, NAME)
    if watchdog is None and dead_dog is not None and any(
            procs.pid_file(s, c.proc_name).exists() for c in local_components()):
        out.append(f"watchdog (pid {dead_dog}) is not running: a component that crashes stays down until "
                   "`rpm up` starts the watchdog again")
    if airflow_stack.wanted(s) and procs.read_pid(s, airflow_stack.NAME) is None:
        pid = procs.recorded_pid(s, airflow_stack.NAME)
        out.append(f"Airflow supervisor{f' (pid {pid})' if pid else ''} is not running: the stack's components "
                   "are not restarted; " + ("the watchdog restarts the stack after its back-off" if watchdog
                                           else "`rpm up --airflow` starts it again"))
    return out


if __name__ == "__main__":
    sys.exit(run(Settings.from_env()))
