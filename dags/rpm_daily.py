"""rpm_daily: once a day, housekeeping and the published telehealth reports.

purge landing segments the warehouse has absorbed and that are past retention -> prune validation reports,
task logs and service logs past RPM_ARTIFACT_RETENTION_DAYS -> compact the clinical warehouse (readings in
patient, time order, in a new encrypted file swapped in) -> rebuild the pseudonymous telehealth reports ->
record the run (a failed task records a failed run instead: `rpm ops status` says failing).

Wiring only: every task calls one function of `pipeline.tasks` and returns its small summary. Every task is
safe to retry: a purge deletes only ledger-listed segments, so a second run finds nothing more to delete; a
compaction that died is discarded or finished by the next one.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.sdk import dag, get_current_context, task

from pipeline import tasks  # light at parse time: settings only


@dag(
    dag_id="rpm_daily",
    schedule="@daily",
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,  # one writer: DuckDB allows a single writing process
    default_args={"retries": 2, "retry_delay": timedelta(minutes=1), "on_failure_callback": tasks.on_failure},
    tags=["rpm", "housekeeping"],
    doc_md=__doc__,
)
def rpm_daily():
    @task
    def purge_landing() -> dict:
        """Delete sealed landing segments the ledger lists as absorbed and older than
        RPM_LANDING_RETENTION_DAYS (never one the warehouse has not absorbed)."""
        return tasks.purge_landing()

    @task
    def rebuild_reports() -> dict:
        """Rebuild the telehealth store the reports read (a limited data set: README, the telehealth store and HIPAA)."""
        return tasks.rebuild_reports()

    @task
    def prune_artifacts() -> dict:
        """Delete validation reports, Airflow task logs and rotated service logs older than
        RPM_ARTIFACT_RETENTION_DAYS; rotate live service logs over 10 MB."""
        return tasks.prune_artifacts()

    @task
    def compact_warehouse() -> dict:
        """Rewrite the clinical warehouse with readings sorted by (patient, time) into a new encrypted file and
        swap it in (per-patient queries then skip other patients' data); pipeline writes wait meanwhile."""
        return tasks.compact_warehouse()

    @task
    def record_run() -> dict:
        """Record the run for ops (each task's seconds), so a recovery after a failed run is seen."""
        ctx = get_current_context()
        results = {t: ctx["ti"].xcom_pull(task_ids=t) or {} for t in ("purge_landing", "prune_artifacts",
                                                                       "compact_warehouse", "rebuild_reports")}
        return tasks.record_daily(ctx["run_id"], ctx["dag_run"].start_date, results)

    # Purge first: the reports never read landing, and a slow report must not hold back freeing disk. The
    # reports are rebuilt from the snapshot the compaction publishes.
    purge_landing() >> prune_artifacts() >> compact_warehouse() >> rebuild_reports() >> record_run()


rpm_daily()
