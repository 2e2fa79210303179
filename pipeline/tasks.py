"""The DAGs' tasks: each reads the settings (from the environment, unless given), opens what its step needs,
calls the step with its connection, sizes and settings, and returns a small result for XCom (ids and
counts, never data).

Cross-cutting work happens here, once, around every task: its wall time and its own peak memory are added to
its result, and what it left in memory is handed back before the next task (under ``dag.test()`` every task
shares one process). A task that fails after its retries leaves a failed run record (``on_failure``).
Nothing heavy is imported at module level: the DAG files import this module while Airflow parses them.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.settings import Settings
from pipeline import Sizes

if TYPE_CHECKING:
    from airflow.sdk import AssetOrTimeSchedule

log = logging.getLogger("rpm.pipeline")
# Task logs run at INFO (rpmctl.services.airflow_run): GX's own INFO chatter would bury our one line per task.
logging.getLogger("great_expectations").setLevel(logging.WARNING)

TIMING_KEYS = ("seconds", "peak_rss_mb")  # what timing adds to a task's result (not the task's own data)
SIZES = Sizes()
# The tasks whose results make up a run's record (rpm_pipeline's record_run pulls them from XCom).
RECORDED_TASKS = ("claim", "decode_normalise", "validate", "load", "evaluate_alerts")


def schedule() -> AssetOrTimeSchedule:
    """When rpm_pipeline runs: as soon as ingest seals a landing segment, else every
    RPM_PIPELINE_SCHEDULE_MINUTES (pipeline/seal_trigger.py); read when Airflow parses the DAG."""
    from pipeline.seal_trigger import schedule as seal_or_time

    return seal_or_time(Settings.from_env())


# What the tasks import when they run (pandas, DuckDB, Great Expectations and the steps over them).
STEP_MODULES = ("pipeline.stage", "pipeline.validate", "pipeline.validation_report", "warehouse.db",
                "warehouse.ledger", "warehouse.load", "warehouse.alerts", "warehouse.ops", "warehouse.serving",
                "warehouse.telehealth")


def preload() -> None:
    """Import every step and build GX's context now, in a process the task processes are forked from
    (pipeline/executor.py): each task then starts with them instead of paying several seconds itself."""
    import importlib

    from expectations.suite import warm

    for name in STEP_MODULES:
        importlib.import_module(name)
    warm()


def timed(name: str, step: Callable[[], dict]) -> dict:
    """Run a task's step, adding its wall time and its own peak memory (the process's high-water mark reset
    first: several tasks may share one process), then release what it left behind."""
    _reset_peak_rss()
    start = time.monotonic()
    out = step()
    result = {**out, "seconds": round(time.monotonic() - start, 3), "peak_rss_mb": _peak_rss_mb()}
    _release_free_memory()
    log.info("%s", log_line(name, result))
    return result


def log_line(name: str, result: dict) -> str:
    """The task's one INFO line in its Airflow log: counts by outcome and rule, sizes, seconds. Results hold ids
    and counts only (never values or identifiers); a list (segment names) is logged as its length."""
    def show(value: Any) -> str:
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k}: {show(v)}" for k, v in sorted(value.items())) + "}"
        if isinstance(value, list | tuple):
            return str(len(value))
        return str(value)
    return f"rpm {name}: " + " ".join(f"{k}={show(v)}" for k, v in result.items())


# --- rpm_pipeline --------------------------------------------------------------------------------------------

def claim(s: Settings | None = None) -> dict:
    from warehouse.db import clinical
    from warehouse.ledger import claim_segments

    s = s or Settings.from_env()

    def step() -> dict:
        with clinical(s) as con:
            return claim_segments(con, s.landing_dir, s.pipeline_max_segments).to_xcom()
    return timed("claim", step)


def decode_normalise(batch: dict, s: Settings | None = None) -> dict:
    from pipeline.stage import stage_batch
    from warehouse.db import clinical
    from warehouse.ledger import Batch

    s = s or Settings.from_env()

    def step() -> dict:
        with clinical(s) as con:
            return stage_batch(con, s, Batch.from_xcom(batch), SIZES.stage_messages, SIZES.stage_items).to_xcom()
    return timed("decode_normalise", step)


def validate(batch: dict, s: Settings | None = None) -> dict:
    from expectations.suite import warm
    from pipeline.validate import validate_batch
    from warehouse.db import clinical
    from warehouse.ledger import Batch

    s = s or Settings.from_env()
    warm()  # GX's import is start-up, not work: the recorded seconds are the validation's own

    def step() -> dict:
        with clinical(s) as con:
            return validate_batch(con, s, Batch.from_xcom(batch), SIZES.validate_rows).to_xcom()
    return timed("validate", step)


def load(batch: dict, run_id: str, s: Settings | None = None) -> dict:
    from warehouse.db import clinical
    from warehouse.ledger import Batch
    from warehouse.load import load_batch

    s = s or Settings.from_env()

    def step() -> dict:
        with clinical(s) as con:
            return load_batch(con, Batch.from_xcom(batch), run_id, SIZES.load_items).to_xcom()
    return timed("load", step)


def evaluate_alerts(s: Settings | None = None) -> dict:
    from warehouse.alerts import evaluate

    s = s or Settings.from_env()
    return timed("evaluate_alerts", lambda: evaluate(s))


def record_run(run_id: str, started_at: datetime | None, results: dict[str, dict],
               s: Settings | None = None) -> dict:
    """The run's record (counts, every task's seconds, freshness) and its validation report."""
    from pipeline.validation_report import write_report
    from warehouse.db import clinical
    from warehouse.ops import RunCounts
    from warehouse.ops import record_run as write_record

    s = s or Settings.from_env()
    load, checked = results.get("load", {}), results.get("validate", {})
    counts = RunCounts(batch_id=results.get("claim", {}).get("batch_id"), loaded=load.get("loaded", 0),
                       quarantined=load.get("quarantined", 0), duplicates=load.get("duplicates", 0),
                       failures_by_rule=checked.get("failures_by_rule", {}))

    def step() -> dict:
        with clinical(s) as con:
            row, by_reason = write_record(con, run_id, started_at, counts,
                                          {task: r.get("seconds") for task, r in results.items()})
        report = write_report(s, row, by_reason)
        return {**{k: v for k, v in row.items() if k not in ("started_at", "finished_at")}, "report": str(report)}
    return timed("record_run", step)


def publish_snapshot(s: Settings | None = None) -> dict:
    from warehouse.serving import publish_snapshot as publish

    s = s or Settings.from_env()
    return timed("publish_snapshot", lambda: {"snapshot": publish(s).name})


def quality_gate(recorded: dict, s: Settings | None = None) -> dict:
    """Judge the run's batch by its quarantine rate (RPM_QUARANTINE_WARN / _FAIL): the DAG skips the task on
    "warn" and fails it on "fail", so the Airflow grid shows the run; the readings it loaded stay loaded."""
    from warehouse.ops import quarantine_gate

    s = s or Settings.from_env()
    gate = quarantine_gate(s, recorded.get("quarantined"), recorded.get("received"),
                           f"run {recorded.get('run_id')}")
    result = {"level": gate.level, "rate": gate.rate, "quarantined": gate.quarantined, "received": gate.received,
              "message": gate.message, "report": recorded.get("report")}
    log.info("%s", log_line("quality_gate", result))
    return result


def publish_telehealth(s: Settings | None = None) -> dict:
    """Update the telehealth store with what this run loaded (a full rebuild when an update cannot be trusted)."""
    from warehouse.telehealth import publish_telehealth as publish

    s = s or Settings.from_env()
    return timed("publish_telehealth", lambda: publish(s))


def on_failure(context: Any) -> None:
    """Airflow failure callback: a task that failed after its retries leaves a failed run record, published
    so readers (`rpm ops status`) see it without touching the writer."""
    from warehouse.db import clinical
    from warehouse.ops import record_failure
    from warehouse.serving import publish_snapshot as publish

    s = Settings.from_env()
    ti = context.get("task_instance") or context.get("ti")
    error = context.get("exception")
    dag_id = getattr(context.get("dag"), "dag_id", None) or getattr(ti, "dag_id", None) or "rpm_pipeline"
    with clinical(s) as con:
        record_failure(con, str(context.get("run_id")), getattr(ti, "task_id", "?"),
                       f"{type(error).__name__}: {error}", dag_id=dag_id)
        publish(s, con)


# --- rpm_daily -----------------------------------------------------------------------------------------------

def purge_landing(s: Settings | None = None) -> dict:
    from warehouse.retention import purge_landing as purge

    s = s or Settings.from_env()
    return timed("purge_landing", lambda: purge(s))


def compact_warehouse(s: Settings | None = None) -> dict:
    from warehouse.compaction import compact

    s = s or Settings.from_env()

    def step() -> dict:
        if not s.clinical_db.exists():
            return {"compacted": False}  # nothing loaded yet: nothing to sort
        return {"compacted": True, **compact(s, memory_limit=s.compaction_memory_limit).to_xcom()}
    return timed("compact_warehouse", step)


def rebuild_reports(s: Settings | None = None) -> dict:
    from warehouse.telehealth import publish_telehealth as publish

    s = s or Settings.from_env()
    # rpm_pipeline updates the store run by run; once a day it is rebuilt whole (the repair path), which
    # also re-measures what an update could only take on trust.
    return timed("rebuild_reports", lambda: publish(s, full=True))


def prune_artifacts(s: Settings | None = None) -> dict:
    from pipeline.housekeeping import prune_artifacts as prune

    s = s or Settings.from_env()
    return timed("prune_artifacts", lambda: prune(s))


def record_daily(run_id: str, started_at: datetime | None, results: dict[str, dict],
                 s: Settings | None = None) -> dict:
    """rpm_daily's run record (a failure is recorded by ``on_failure``), published for `rpm ops status`."""
    from warehouse.db import clinical
    from warehouse.ops import record_housekeeping
    from warehouse.serving import publish_snapshot as publish

    s = s or Settings.from_env()

    def step() -> dict:
        if not s.clinical_db.exists():
            return {"recorded": False}  # nothing loaded yet: no warehouse to record in
        with clinical(s) as con:
            row = record_housekeeping(con, run_id, started_at, {t: r.get("seconds") for t, r in results.items()})
            publish(s, con)
        return {"recorded": True, "run_id": row["run_id"]}
    return timed("record_daily", step)


# --- memory --------------------------------------------------------------------------------------------------

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
