"""Airflow's metadata DB stays bounded: what is older than RPM_ARTIFACT_RETENTION_DAYS is removed by the real
`airflow db clean` — daily by rpm up --airflow's supervisor, or deploy/systemd's timer — and what is newer stays.

On the 1-minute schedule Airflow records 1,440 runs a day with their task instances, logs and asset events, and
removes none of them itself."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from core.settings import Settings
from rpmctl.services import airflow_stack
from rpmctl.services.airflow_run import airflow_env

AGES_DAYS = (40, 15, 13, 1)  # retention 14: the first two go


def metadata(settings: Settings, template: Path) -> sqlite3.Connection:
    """A migrated metadata DB whose audit log and job table hold rows of AGES_DAYS."""
    home = Path(settings.airflow_home)  # type: ignore[arg-type]
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, home / "airflow.db")
    con = sqlite3.connect(home / "airflow.db")
    now = datetime.now(UTC)
    for days in AGES_DAYS:
        at = (now - timedelta(days=days)).strftime("%Y-%m-%d %H:%M:%S.%f")
        con.execute("INSERT INTO log (dttm, event) VALUES (?, ?)", (at, f"aged {days}"))
        con.execute("INSERT INTO job (job_type, state, latest_heartbeat, start_date, hostname) "
                    "VALUES ('SchedulerJob', 'success', ?, ?, ?)", (at, at, f"aged {days}"))
    con.commit()
    return con


def aged(con: sqlite3.Connection, table: str, column: str) -> list[str]:
    return sorted(r[0] for r in con.execute(f"SELECT {column} FROM {table} WHERE {column} LIKE 'aged %'"))


def test_the_supervisor_cleans_what_is_older_than_the_retention_and_keeps_the_rest(
        settings: Settings, airflow_db_template: Path, monkeypatch) -> None:
    s = settings.replace(artifact_retention_days=14)
    con = metadata(s, airflow_db_template)
    for key, value in airflow_env(s).items():  # the supervisor runs in the stack's environment
        monkeypatch.setenv(key, value)
    cleaner = airflow_stack._MetadataCleaner(s, first_s=0, every_s=3600)
    cleaner.tend()
    assert cleaner.proc is not None, "due at once, not started"
    assert cleaner.proc.wait(timeout=120) == 0
    cleaner.tend()  # notes the end; the next one is an hour away
    assert cleaner.proc is None
    assert aged(con, "log", "event") == ["aged 1", "aged 13"]
    assert aged(con, "job", "hostname") == ["aged 1", "aged 13"]


def test_the_systemd_one_shot_runs_the_same_clean(settings: Settings, airflow_db_template: Path) -> None:
    s = settings.replace(artifact_retention_days=14)
    con = metadata(s, airflow_db_template)
    done = subprocess.run([sys.executable, "-m", "rpmctl.services.airflow_stack", "clean"],
                          env={**os.environ, **airflow_env(s)}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert aged(con, "log", "event") == ["aged 1", "aged 13"]


def test_the_window_follows_the_retention_setting() -> None:
    now = datetime(2026, 12, 7, 6, 0, tzinfo=UTC)
    argv = airflow_stack.clean_argv(Settings(artifact_retention_days=3), now)
    assert argv[argv.index("--clean-before-timestamp") + 1] == "2026-12-04T06:00:00+00:00"
    assert set(argv[argv.index("--tables") + 1].split(",")) >= {"dag_run", "task_instance", "asset_event", "log"}
    assert "--error-on-cleanup-failure" in argv  # a failed clean is a failed unit, not a silent success
