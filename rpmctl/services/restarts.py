"""Restarts: the back-off both supervisors wait before bringing a component back, and the log of every restart.

Two supervisors restart components: the watchdog `rpm up` starts (broker, ingest, clinician service, metrics
exporter: rpmctl/services/supervisor.py) and the Airflow supervisor (scheduler, DAG processor, API server,
triggerer: airflow_stack.supervise). Both append to one file, ``run_dir/restarts.jsonl``, so `rpm status` and
`rpm ops status` read a component's restarts from one place. A record holds no PHI: a component name, pids,
how the process ended, the attempt and the back-off waited.

Back-off: 1 s before the first restart, doubling up to 60 s, so a component that keeps crashing is still
restarted once a minute without spinning; the count starts again once a component has stayed up for a minute.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from core.settings import Settings
from rpmctl.services import procs

LOG_NAME = "restarts.jsonl"
LOG_MAX_BYTES = 1024 * 1024  # ~5,000 restarts; one older file is kept beside it
WINDOW = timedelta(hours=24)


@dataclass
class Backoff:
    """How long to wait before the next restart of one component."""

    initial_s: float = 1.0
    max_s: float = 60.0
    stable_s: float = 60.0  # up this long: the next crash is a first one again
    attempt: int = 0  # restarts since the component last stayed up for stable_s

    def delay(self) -> float:
        return min(self.initial_s * 2 ** self.attempt, self.max_s)

    def restarted(self) -> None:
        self.attempt += 1

    def stayed_up(self, seconds: float) -> None:
        if seconds >= self.stable_s:
            self.attempt = 0


def describe_exit(returncode: int | None) -> str:
    """How a process ended, from a Popen-style return code (negative: the signal that killed it)."""
    if returncode is None:
        return "ended (exit status unknown: not the supervisor's child)"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with {returncode}"


def log_path(s: Settings) -> Path:
    return Path(s.run_dir) / LOG_NAME


def record(s: Settings, component: str, supervisor: str, pid_before: int | None, pid_after: int | None,
           returncode: int | None, attempt: int, backoff_s: float, error: str | None = None) -> dict:
    """Append one restart (or a failed attempt: ``pid_after`` None and the ``error``) to the log."""
    entry = {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "component": component,
        "supervisor": supervisor,
        "pid_before": pid_before,
        "pid_after": pid_after,
        "exit_code": returncode if returncode is not None and returncode >= 0 else None,
        "signal": _signal_name(returncode),
        "reason": describe_exit(returncode),
        "attempt": attempt,
        "backoff_s": backoff_s,
        "error": error,
    }
    path = log_path(s)
    procs.rotate_log(path, LOG_MAX_BYTES, keep=1)
    # One write of one line with O_APPEND: the two supervisors' records never interleave.
    fd = procs.open_log(path)
    try:
        os.write(fd, (json.dumps(entry) + "\n").encode())
    finally:
        os.close(fd)
    return entry


def _signal_name(returncode: int | None) -> str | None:
    if returncode is None or returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return str(-returncode)


def restarts(s: Settings, since: datetime | None = None) -> list[dict]:
    """Every recorded restart, oldest first (only those at or after ``since`` when given)."""
    return [entry for entry, at in _entries(s) if since is None or at >= since]


# Each field a record holds and the types it may have; a line with another type is not a record of ours.
_FIELDS: dict[str, tuple[type, ...]] = {
    "supervisor": (str,), "pid_before": (int,), "pid_after": (int,), "exit_code": (int,), "signal": (str,),
    "reason": (str,), "attempt": (int,), "backoff_s": (int, float), "error": (str,)}


def _entries(s: Settings) -> Iterator[tuple[dict, datetime]]:
    """Each well-formed record with its time. Skipped: a line cut short by a full disk, and any line that is
    not a record as `record` writes it (no component, a time without its zone, a field of the wrong type)."""
    path = log_path(s)
    for file in (path.with_name(f"{path.name}.1"), path):
        try:
            lines = file.read_bytes().splitlines()
        except FileNotFoundError:
            continue
        for line in lines:
            try:
                entry = json.loads(line)
            except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
                continue
            if (at := _valid(entry)) is not None:
                yield entry, at


def _valid(entry: object) -> datetime | None:
    """The record's time when ``entry`` is a record of ours, else None."""
    if not isinstance(entry, dict) or not isinstance(entry.get("component"), str) or not entry["component"]:
        return None
    for key, types in _FIELDS.items():
        value = entry.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
            return None
    try:
        at = datetime.fromisoformat(entry["time"])
    except (KeyError, TypeError, ValueError):
        return None
    return at if at.tzinfo is not None else None


def restart_summary(s: Settings, now: datetime | None = None) -> dict[str, dict]:
    """Per component that was ever restarted: restarts in the last 24 h (failed attempts included), and the
    last one's time, reason, and error when that attempt failed.

    ``{"ingest": {"restarts_24h": 2, "last_restart": "2026-…+00:00", "last_reason": "killed by SIGKILL",
    "last_error": None}, …}`` — a component missing from it has never been restarted."""
    cutoff = (now or datetime.now(UTC)) - WINDOW
    out: dict[str, dict] = {}
    for entry, at in _entries(s):
        item = out.setdefault(entry["component"], {"restarts_24h": 0})
        if at >= cutoff:
            item["restarts_24h"] += 1
        item.update(last_restart=entry["time"], last_reason=entry.get("reason"), last_error=entry.get("error"))
    return out


def restarts_of(summary: dict[str, dict], component: str) -> dict:
    """One component's entry of ``restart_summary``, zeros when it was never restarted."""
    return summary.get(component, {"restarts_24h": 0, "last_restart": None, "last_reason": None,
                                   "last_error": None})
