"""rpm_daily's housekeeping of what piles up beside landing: validation reports, Airflow task logs, service logs.

With 1-minute runs a week leaves ~10,000 validation reports and ~100,000 task log files; the services' logs
grow for as long as they run. Each day, everything last written more than ``artifact_retention_days`` ago is
deleted, and a live service log over ``LOG_MAX_BYTES`` is rotated in place (copy, then truncate: the services
write with O_APPEND, so their next line goes to the start of the emptied file; a line written between the copy
and the truncation is lost — logrotate's ``copytruncate`` trade-off, for logs whose writers cannot reopen).

Landing segments have their own rule (warehouse/retention.py: only once absorbed); serving snapshots keep the
newest few on every publish (warehouse/serving.py). What is pruned here is deleted, not archived.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import time
from pathlib import Path

from core.logfiles import shift_rotated
from core.settings import Settings
from pipeline.validation_report import prune_reports

log = logging.getLogger("rpm.pipeline")

LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_KEEP = 5  # rotated copies of a live log (name.log.1 .. name.log.5), besides the age limit


def prune_artifacts(s: Settings, days: int | None = None, now: float | None = None) -> dict:
    """Delete what is older than ``days`` (default ``artifact_retention_days``); returns counts per kind."""
    days = s.artifact_retention_days if days is None else days
    cutoff = (time.time() if now is None else now) - days * 86400
    rotated, deleted_logs = _service_logs(s, cutoff)
    return {"days": days, "validation_reports": prune_reports(s, cutoff),
            "task_log_files": _prune_tree(Path(s.airflow_home) / "logs", cutoff),
            "service_logs_rotated": rotated, "service_logs_deleted": deleted_logs}


def _prune_tree(root: Path, cutoff: float) -> int:
    """Files under ``root`` last modified before ``cutoff``, then the folders they leave empty (not ``root``).
    Symlinks are removed as links, never followed; a ``root`` that is itself a symlink is left alone (point
    Airflow's AIRFLOW__LOGGING__BASE_LOG_FOLDER at another disk instead: then that folder is pruned)."""
    if root.is_symlink():
        log.warning("not pruning %s: it is a symlink", root)
        return 0
    removed = 0
    emptied: set[str] = set()
    for folder, dirs, files in os.walk(root, topdown=False):
        kept = False
        for name in files:
            path = os.path.join(folder, name)
            try:
                if os.lstat(path).st_mtime < cutoff:
                    os.unlink(path)
                    removed += 1
                else:
                    kept = True
            except FileNotFoundError:
                continue
        # rmdir only a folder left empty: a failed rmdir of a full one costs as much as a delete (a week of runs
        # is ~20,000 folders, most of them kept), and a linked folder in ``dirs`` is never emptied here.
        if folder != str(root) and not kept and all(os.path.join(folder, d) in emptied for d in dirs):
            try:
                os.rmdir(folder)
                emptied.add(folder)
            except OSError:
                pass  # written to meanwhile
    return removed


def service_logs(s: Settings) -> list[Path]:
    """The live logs of the local services: run_dir/*.log (ingest, service, Airflow's supervisor, the metrics
    exporter, `rpm pipeline run`) and the broker's."""
    return sorted(Path(s.run_dir).glob("*.log")) + [Path(s.broker_dir) / "mosquitto.log"]


def _service_logs(s: Settings, cutoff: float) -> tuple[int, int]:
    rotated = deleted = 0
    for log in service_logs(s):
        if _rotate(log):
            rotated += 1
        for old in log.parent.glob(f"{log.name}.*"):
            if old.name.removeprefix(f"{log.name}.").isdigit() and old.lstat().st_mtime < cutoff:
                old.unlink(missing_ok=True)
                deleted += 1
    return rotated, deleted


def _rotate(log: Path) -> bool:
    try:
        st = log.lstat()
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_size <= LOG_MAX_BYTES:
        return False  # a symlink planted in place of a log is never followed (copied, then truncated)
    shift_rotated(log, LOG_KEEP)
    copy = log.with_name(f"{log.name}.1")
    copy.unlink(missing_ok=True)
    # Neither end through a symlink: O_NOFOLLOW on the log (copied, then truncated through the same
    # descriptor), O_EXCL (a fresh file) for the copy.
    with os.fdopen(os.open(log, os.O_RDWR | os.O_NOFOLLOW), "r+b") as src, os.fdopen(
            os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600), "wb") as dst:
        shutil.copyfileobj(src, dst)
        src.truncate(0)
    return True
