"""`rpm pipeline run`: one real Airflow run of rpm_pipeline (``dag.test()``), no scheduler needed."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

from core.landing import SEGMENT_SUFFIX, count_records, open_dir
from core.settings import Settings
from rpmctl.services import procs


def dags_folder() -> Path:
    """Where the installed `dags` package is (found, not imported): Airflow parses the files in it."""
    spec = importlib.util.find_spec("dags")
    if spec is None or spec.origin is None:
        raise RuntimeError("the dags package is not installed: reinstall rpm-pipeline")
    return Path(spec.origin).parent
INGEST = "ingest"


def airflow_env(s: Settings) -> dict[str, str]:
    """Environment for Airflow processes: its home under RPM_HOME, our DAGs, no examples, quiet."""
    return {
        **s.as_env(),
        "AIRFLOW_HOME": str(s.airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder()),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        # INFO: each task's one line of counts and seconds (pipeline.tasks.log_line) is its log's useful part.
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "GX_ANALYTICS_ENABLED": "false",
    }


def ensure_airflow_db(s: Settings) -> None:
    """Create Airflow's metadata DB (SQLite under AIRFLOW_HOME) the first time."""
    Path(s.airflow_home).mkdir(parents=True, exist_ok=True)
    if (Path(s.airflow_home) / "airflow.db").exists():
        return
    airflow = Path(sys.executable).with_name("airflow")
    subprocess.run([str(airflow), "db", "migrate"], env={**os.environ, **airflow_env(s)}, check=True,
                   stdout=subprocess.DEVNULL)


def seal_open_segments(s: Settings, timeout: float = 15.0) -> None:
    """Ask a running ingest service to seal what it has landed, and wait until it has."""
    pid = procs.read_pid(s, INGEST)
    if pid is None:
        return
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(count_records(p)
                   for p in open_dir(s.landing_dir).glob(f"*{SEGMENT_SUFFIX}")):
            return
        time.sleep(0.05)


def run_once(s: Settings) -> dict:
    """Run rpm_pipeline once in this process; returns {task_id: state}. Raises if the run failed."""
    ensure_airflow_db(s)
    os.environ.update(airflow_env(s))
    # Airflow's in-process API client trips a third-party deprecation notice on every run: not ours to fix.
    warnings.filterwarnings("ignore", message=".*httpx.*starlette.*")
    from airflow.dag_processing.dagbag import DagBag

    # Parsing the DAGs and dag.test() log (at INFO: a failed task's traceback included) on stdout and stderr,
    # which belong to the command (`--json`, one-line errors): the run's log goes to run/pipeline-run.log
    # instead, at the file-descriptor level (Airflow's handlers hold the descriptors).
    log = procs.private_run_dir(s) / "pipeline-run.log"
    procs.rotate_log(log)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = procs.open_log(log)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        bag = DagBag(dag_folder=str(dags_folder()))
        if bag.import_errors:
            raise RuntimeError(f"DAG import errors: {bag.import_errors}")
        run = bag.get_dag("rpm_pipeline").test()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
    states = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
    failed = [t for t, st in states.items() if st == "failed"]
    # A failed quality gate is a verdict on the batch, not a broken run: everything was loaded and published.
    if str(run.state) != "success" and failed != ["quality_gate"]:
        raise RuntimeError(f"rpm_pipeline run {run.run_id} ended {run.state} (failed: {', '.join(failed) or '-'}; "
                           f"tasks {states}); its log: {log}")
    from pipeline.validation_report import report_path
    from warehouse.ops import quarantine_gate
    from warehouse.serving import serving

    with serving(s) as con:  # what this run set aside: named in its result, not only in the task log
        rejected = [{"segment": r[0], "reason": r[1]} for r in con.execute(
            "SELECT segment, reason FROM rejected_segments WHERE run_id = ? ORDER BY segment", [run.run_id]
        ).fetchall()]
        counts = con.execute("SELECT quarantined, received FROM pipeline_runs WHERE run_id = ?",
                             [run.run_id]).fetchone() or (0, 0)
    gate = quarantine_gate(s, counts[0], counts[1], f"run {run.run_id}")
    return {"run_id": run.run_id, "state": str(run.state), "tasks": states, "rejected": rejected,
            "quality_gate": {"level": gate.level, "rate": gate.rate, "message": gate.message,
                             "validation_report": str(report_path(s, run.run_id))}}
