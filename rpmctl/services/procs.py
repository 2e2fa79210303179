"""Background processes with pid files and logs under ``run_dir``.

A pid file says a service is wanted: `start` writes it, `stop` removes it, and a crash leaves it naming a dead
process — which is how the watchdog (rpmctl/services/supervisor.py) tells a crash, which it repairs, from a stop
on purpose, which it leaves alone. Start, stop and the watchdog's restart each hold the service's lock file, so
a restart never races a stop or another start into two instances or a revived service.

A pid file is trusted only for a process that is ours (`ours`): one `start` launched for that very pid file
(it carries the file's path in its environment, RPM_PID_FILE), or, for one started before that marker
existed, a process whose command line and RPM_HOME name this state folder. A pid file naming anyone else's
process (the pid reused after a crash or a reboot, a file written by hand) is stale: it is never signalled,
`start` and `stop` remove it with a warning, and a pid file that holds no valid pid at all is ignored the same
way (named once on stderr).
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from core.logfiles import shift_rotated
from core.settings import Settings
from rpmctl.errors import printable

# A service log is rotated when its service starts and the log is over this size; LOG_KEEP older ones stay.
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_KEEP = 3
# In the environment of every process `start` launches: the absolute path of the pid file naming it.
OWNER_VAR = "RPM_PID_FILE"
PID_MAX = 1 << 22  # Linux's ceiling for /proc/sys/kernel/pid_max: anything larger names no process


class StartError(RuntimeError):
    pass


def pid_file(s: Settings, name: str) -> Path:
    return Path(s.run_dir) / f"{name}.pid"


def log_file(s: Settings, name: str) -> Path:
    return Path(s.run_dir) / f"{name}.log"


def recorded_pid(s: Settings, name: str) -> int | None:
    """The pid the pid file names, running or not; None without a pid file, or when it holds no valid pid
    (garbage, 0, -1, beyond PID_MAX: signalling 0 or -1 would reach a whole group or every process) —
    that file is named once on stderr."""
    path = pid_file(s, name)
    try:  # at most 64 bytes, never blocking: whatever was put there (a symlink to a FIFO or /dev/zero)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        warn(f"ignoring {path}: {exc.strerror or exc}")
        return None
    try:
        raw = os.read(fd, 64)
    except OSError as exc:
        warn(f"ignoring {path}: {exc.strerror or exc}")
        return None
    finally:
        os.close(fd)
    text = raw.decode(errors="replace").strip()
    if text.isascii() and text.isdigit() and 0 < int(text) <= PID_MAX:
        return int(text)
    if not text:  # being written by `start` right now (or emptied): nothing to name
        return None
    warn(f"ignoring {path}: {text[:20]!r} is not a process id")
    return None


def read_pid(s: Settings, name: str) -> int | None:
    """The pid of the running service, or None. The pid file of a dead service stays until `stop`: it records
    that the service is wanted (the watchdog restarts it). A live pid that is not ours counts as dead."""
    pid = recorded_pid(s, name)
    return pid if pid is not None and alive(pid) and ours(s, name, pid) else None


def ours(s: Settings, name: str, pid: int) -> bool:
    """Whether ``pid`` runs this state folder's ``name``: `start` launched it for this pid file, or (started
    before that marker existed) it is Mosquitto run with this state folder's config, or Python running an
    rpmctl module with this RPM_HOME. Anyone else's process — the pid reused, a pid file written by hand — is not."""
    try:
        proc = psutil.Process(pid)
        cmdline = proc.cmdline()
    except psutil.Error:
        return False
    try:
        env = proc.environ()
    except psutil.Error:  # e.g. Mosquitto after dropping to its own account, without CAP_SYS_PTRACE
        env = {}
    if OWNER_VAR in env:
        return env[OWNER_VAR] == _owner_mark(s, name)
    from rpmctl.services import broker  # broker imports this module

    # The exact command lines `start` uses: a program that merely mentions the config or a module is not one.
    program, args = (os.path.basename(cmdline[0]), cmdline[1:]) if cmdline else ("", [])
    if program == "mosquitto" and args[:2] == ["-c", str(broker.conf_path(s))]:
        return True
    return (program.startswith("python") and args[:1] == ["-m"] and len(args) > 1
            and args[1].startswith("rpmctl.") and env.get("RPM_HOME") == str(s.home))


def _owner_mark(s: Settings, name: str) -> str:
    return str(pid_file(s, name).resolve())


def _forget_stranger(s: Settings, name: str) -> None:
    """Remove a pid file naming a live process that is not ours (never signalled)."""
    pid = recorded_pid(s, name)
    if pid is not None and alive(pid) and not ours(s, name, pid):
        warn(f"{pid_file(s, name)} names pid {pid}, which is not this state folder's {name} "
             f"({_describe(pid)}): removed as stale, the process left alone")
        pid_file(s, name).unlink(missing_ok=True)


def _describe(pid: int) -> str:
    try:
        return printable(" ".join(psutil.Process(pid).cmdline()))[:80] or "no command line"
    except psutil.Error:
        return "command line unreadable"


_warned: set[str] = set()


def warn(message: str) -> None:
    """One line on stderr, once per process (status reads each pid file several times)."""
    if message not in _warned:
        _warned.add(message)
        print(f"rpm: {printable(message)}", file=sys.stderr, flush=True)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: one that is our child is reaped here)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        pass
    try:  # someone else's child: dead but not yet reaped by its parent is dead too
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


_held: set[Path] = set()  # lock files this process holds (the watchdog restarts through the start functions)


@contextmanager
def lock(s: Settings, name: str) -> Iterator[None]:
    """Hold the service's lock (run/<name>.lock) across a start, a stop or a restart; re-entrant within a
    process. The kernel releases it when the holder dies, however it dies."""
    path = private_run_dir(s) / f"{name}.lock"
    if path in _held:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _held.add(path)
        try:
            yield
        finally:
            _held.discard(path)
    finally:
        os.close(fd)  # releases the lock


def private_run_dir(s: Settings) -> Path:
    """run_dir, owner only (0700): service logs name devices, clients' addresses and errors about patients."""
    run_dir = Path(s.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if run_dir.stat().st_mode & 0o077:  # made wider by an older version
        os.chmod(run_dir, 0o700)
    return run_dir


def rotate_log(path: Path, max_bytes: int = LOG_MAX_BYTES, keep: int = LOG_KEEP) -> bool:
    """Move a log over ``max_bytes`` aside (name.log -> name.log.1 -> ... -> name.log.<keep>, the oldest
    dropped). Only for a log no running process writes. True if it rotated."""
    try:
        if path.stat().st_size < max_bytes:
            return False
    except FileNotFoundError:
        return False
    shift_rotated(path, keep)
    os.replace(path, path.with_name(f"{path.name}.1"))
    return True


def open_log(path: Path) -> int:
    """A file descriptor appending to ``path``, created (or narrowed to) 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.fchmod(fd, 0o600)
    return fd


def start(s: Settings, name: str, argv: list[str], env: dict[str, str] | None = None,
          ready: Callable[[], bool] | None = None, timeout: float = 20.0,
          log_max_bytes: int = LOG_MAX_BYTES) -> int:
    """Start ``argv`` detached in its own session, logging to run/<name>.log (0600, rotated first when over
    ``log_max_bytes``); wait until ``ready()``. Returns the running one's pid when it is already up."""
    with lock(s, name):
        return _start(s, name, argv, env, ready, timeout, log_max_bytes)


def _start(s: Settings, name: str, argv: list[str], env: dict[str, str] | None,
           ready: Callable[[], bool] | None, timeout: float, log_max_bytes: int) -> int:
    _forget_stranger(s, name)
    existing = read_pid(s, name)
    if existing:
        return existing
    private_run_dir(s)
    rotate_log(log_file(s, name), log_max_bytes)
    log = os.fdopen(open_log(log_file(s, name)), "ab")  # handed to the child
    # umask 077: whatever the service creates (segments, logs, persistence, Airflow's files) is private.
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**os.environ, **(env or {}), OWNER_VAR: _owner_mark(s, name)},
                            start_new_session=True, umask=0o077)
    log.close()
    _exec_done(proc)
    pid_file(s, name).write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + timeout
    while ready is not None and not ready():
        if proc.poll() is not None:
            pid_file(s, name).unlink(missing_ok=True)
            raise StartError(f"{name} exited with {proc.returncode}; see {log_file(s, name)}:\n"
                             + tail(log_file(s, name)))
        if time.monotonic() > deadline:
            stop(s, name)
            raise StartError(f"{name} not ready after {timeout:.0f}s; see {log_file(s, name)}:\n"
                             + tail(log_file(s, name)))
        time.sleep(0.05)
    return proc.pid


def _exec_done(proc: subprocess.Popen, timeout: float = 2.0) -> None:
    """Wait until the child's command line and environment are in place: Popen returns while the kernel is
    still setting them up, and a pid file read then would name a process `ours` cannot recognise yet."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if psutil.Process(proc.pid).cmdline():
                return
        except psutil.Error:
            return
        time.sleep(0.001)


def stop(s: Settings, name: str, sig: int = signal.SIGTERM, timeout: float = 30.0) -> bool:
    """Signal the service and wait for it to exit; escalate to SIGKILL after ``timeout``. Removes the pid file
    (no longer wanted) even when the service had died. True if it was running."""
    if not pid_file(s, name).exists():
        return False
    with lock(s, name):
        return _stop(s, name, sig, timeout)


def _stop(s: Settings, name: str, sig: int, timeout: float) -> bool:
    _forget_stranger(s, name)
    pid = read_pid(s, name)
    if pid is None:
        pid_file(s, name).unlink(missing_ok=True)
        return False
    os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
        time.sleep(0.05)
    pid_file(s, name).unlink(missing_ok=True)
    return True


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""
