"""Pipeline health for the ops team: one record per DAG run, failures included, and a verdict.

A run record holds counts, each task's duration and freshness — how long readings took from measurement to
the broker (device buffering), from receipt to load (our pipeline), and end to end — as p50/p95. No PHI.
"""

from __future__ import annotations

import ctypes
import gc
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rpmctl.settings import Settings
from warehouse.db import clinical, rows
from warehouse.validation_report import write_report

# Seconds as microsecond differences: epoch() of an INTERVAL is ~10x slower (3.8 s vs 0.4 s, 300k readings).
FRESHNESS = """
WITH lag AS (
    SELECT (epoch_us(received_at) - epoch_us(measured_at)) / 1e6 AS buffered,
           (epoch_us(loaded_at) - epoch_us(received_at)) / 1e6 AS pipeline,
           (epoch_us(loaded_at) - epoch_us(measured_at)) / 1e6 AS end_to_end
    FROM readings WHERE run_id = ?
)
SELECT b[1], b[2], p[1], p[2], e[1], e[2]
FROM (SELECT quantile_cont(buffered, [0.5, 0.95]) AS b, quantile_cont(pipeline, [0.5, 0.95]) AS p,
             quantile_cont(end_to_end, [0.5, 0.95]) AS e
      FROM lag)
"""  # one quantile state per lag, not one per percentile: exact quantiles keep every value in memory


def record_run(s: Settings, run_id: str, started_at: datetime | None, results: dict[str, dict]) -> dict:
    """Write the run's record (idempotent per run id): counts from the load, durations from every task."""
    load = results.get("load", {})
    failures = results.get("validate", {})
    with clinical(s) as con:
        seg = con.execute("""SELECT count(*), coalesce(sum(messages), 0), coalesce(sum(items), 0)
                             FROM segments WHERE run_id = ?""", [run_id]).fetchone()
        lag = con.execute(FRESHNESS, [run_id]).fetchone()
        rejected = _rejected_in_batch(con, run_id, results.get("claim", {}).get("batch_id"))
        row = {
            "run_id": run_id, "state": "success", "started_at": started_at, "finished_at": datetime.now(UTC),
            "segments": seg[0], "messages": seg[1], "received": seg[2],  # type: ignore[index]
            "loaded": load.get("loaded", 0), "quarantined": load.get("quarantined", 0),
            "duplicates": load.get("duplicates", 0), "rejected_segments": rejected,
            "quarantined_by_rule": json.dumps({k: v for k, v in failures.items() if k not in TIMING_KEYS}),
            "task_seconds": json.dumps({task: r.get("seconds") for task, r in results.items()}),
            "measured_to_received_p50_s": lag[0], "measured_to_received_p95_s": lag[1],  # type: ignore[index]
            "received_to_loaded_p50_s": lag[2], "received_to_loaded_p95_s": lag[3],  # type: ignore[index]
            "measured_to_loaded_p50_s": lag[4], "measured_to_loaded_p95_s": lag[5],  # type: ignore[index]
            "failed_task": None, "error": None,
        }
        _upsert(con, row)
        by_reason = dict(con.execute("""SELECT reason, count(*) FROM (SELECT unnest(reasons) AS reason
                                        FROM quarantine WHERE run_id = ?) GROUP BY reason""", [run_id]).fetchall())
    report = write_report(s, row, by_reason)
    return {**{k: v for k, v in row.items() if k not in ("started_at", "finished_at")}, "report": str(report)}


def _rejected_in_batch(con, run_id: str, batch_id: str | None) -> int:
    """Segments this run's batch set aside as unreadable (rows carry the batch id; the run id is added here,
    the stage task does not know it)."""
    if batch_id:
        con.execute("UPDATE rejected_segments SET run_id = ? WHERE batch_id = ? AND replayed_at IS NULL",
                    [run_id, batch_id])
    return con.execute("SELECT count(*) FROM rejected_segments WHERE run_id = ?", [run_id]).fetchone()[0]


def record_failure(s: Settings, run_id: str, task_id: str, error: str) -> None:
    from warehouse.serving import publish_snapshot

    with clinical(s) as con:
        _upsert(con, {"run_id": run_id, "state": "failed", "started_at": None, "finished_at": datetime.now(UTC),
                      "failed_task": task_id, "error": error[:500]})
        publish_snapshot(s, con)  # readers (`rpm ops status`) see the failure without touching the writer


def _upsert(con, row: dict) -> None:
    cols = list(row)
    con.execute("DELETE FROM pipeline_runs WHERE run_id = ?", [row["run_id"]])
    con.execute(f"INSERT INTO pipeline_runs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                [row[c] for c in cols])


def on_task_failure(context: Any) -> None:
    """Airflow failure callback: a failed task (after its retries) leaves a failed run record."""
    ti = context.get("task_instance") or context.get("ti")
    record_failure(Settings.from_env(), str(context.get("run_id")), getattr(ti, "task_id", "?"),
                   f"{type(context.get('exception')).__name__}: {context.get('exception')}")


TIMING_KEYS = ("seconds", "peak_rss_mb")  # what timed() adds to a task's result (not the task's own data)


def timed(fn, *args: Any) -> dict:
    """Call a task's library function and add its wall time (seconds) and its own peak memory (MiB, the
    process's high-water mark reset first: several tasks may share one process) to its small result."""
    _reset_peak_rss()
    start = time.monotonic()
    out = fn(*args)
    seconds, peak = round(time.monotonic() - start, 3), _peak_rss_mb()
    _release_free_memory()
    return {**(out if isinstance(out, dict) else {"result": out}), "seconds": seconds, "peak_rss_mb": peak}


def _release_free_memory() -> None:
    """Hand what the task left behind back to the OS before the next task: garbage in reference cycles
    (pandas and GX leave ~0.8 GB after 2M rows validated), then the heap pages glibc keeps for reuse. Under
    ``dag.test()`` every task shares one process; without this each started from the last one's peak.
    What survives is frozen: Airflow's, GX's and pandas' ~340k long-lived objects made every later collection
    (each task, each chunk) cost ~0.25 s; now those scan only what was made since."""
    gc.collect()
    gc.freeze()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current RSS
    except OSError:
        pass


def _peak_rss_mb() -> float | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


def last_runs(s: Settings, n: int = 5) -> list[dict]:
    from warehouse.serving import serving

    with serving(s) as con:
        return rows(con.execute("SELECT * FROM pipeline_runs ORDER BY finished_at DESC LIMIT ?", [n]))
