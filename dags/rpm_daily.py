"""rpm_daily: once a day, housekeeping and the published telehealth reports.

purge landing segments the warehouse has absorbed and that are past retention -> rebuild the pseudonymous
telehealth reports.

Wiring only: every task calls one function of `pipeline.tasks` and returns its small summary. Both tasks are
safe to retry: a purge deletes only ledger-listed segments, so a second run finds nothing more to delete.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.sdk import dag, task

from pipeline import tasks  # light at parse time: settings only


@dag(
    dag_id="rpm_daily",
    schedule="@daily",
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,  # one writer: DuckDB allows a single writing process
    default_args={"retries": 2, "retry_delay": timedelta(minutes=1)},
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
        """Rebuild the de-identified telehealth store the reports read."""
        return tasks.rebuild_reports()

    # Purge first: the reports never read landing, and a slow report must not hold back freeing disk.
    purge_landing() >> rebuild_reports()


rpm_daily()
