"""Background processes with pid files and logs under ``run_dir`` (no supervisor needed locally)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from core.settings import Settings

# A service log is rotated when its service starts and the log is over this size; LOG_KEEP older ones stay.
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_KEEP = 3


class StartError(RuntimeError):
    pass


def pid_file(s: Settings, name: str) -> Path:
    return Path(s.run_dir) / f"{name}.pid"


def log_file(s: Settings, name: str) -> Path:
    return Path(s.run_dir) / f"{name}.log"


def read_pid(s: Settings, name: str) -> int | None:
    """The pid of a running service, or None (a stale pid file is removed)."""
    path = pid_file(s, name)
    try:
        pid = int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    if _alive(pid):
        return pid
    path.unlink(missing_ok=True)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours is not alive: reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


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
    for n in range(keep - 1, 0, -1):
        older = path.with_name(f"{path.name}.{n}")
        if older.exists():
            os.replace(older, path.with_name(f"{path.name}.{n + 1}"))
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
    ``log_max_bytes``); wait until ``ready()``."""
    existing = read_pid(s, name)
    if existing:
        return existing
    private_run_dir(s)
    rotate_log(log_file(s, name), log_max_bytes)
    log = os.fdopen(open_log(log_file(s, name)), "ab")  # handed to the child
    # umask 077: whatever the service creates (segments, logs, persistence, Airflow's files) is private.
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})}, start_new_session=True, umask=0o077)
    log.close()
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


def stop(s: Settings, name: str, sig: int = signal.SIGTERM, timeout: float = 30.0) -> bool:
    """Signal the service and wait for it to exit; escalate to SIGKILL after ``timeout``."""
    pid = read_pid(s, name)
    if pid is None:
        return False
    os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while _alive(pid):
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
